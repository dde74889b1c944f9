"""Vector code for decode attention over bfloat16 KV caches, written as LLVM IR that numba kernels call
like functions (numba intrinsics), for all the KV heads of one sequence.

numba compiles a 64-wide dot product to a vector multiply-add and a horizontal sum per score, and the
value accumulation to a load and a store of the accumulator per cached position. Here:
- scores: each position's K row is widened from bfloat16 once for its query group; each head's per-
  position partial sums (one 16-lane vector) are folded sixteen positions at a time by a butterfly of
  shuffles, which yields the sixteen scores as one vector (15 folds instead of 16 horizontal sums);
- values: the accumulators are carried in vector registers (what does not fit spills to the stack, not
  to the caller's array) over a block of positions, each V row widened once.
Both read each position's row for all KV heads before the next position: the cache in memory order,
which beats a pass per KV head (strided) once the cache does not fit in the CPU caches.
bfloat16 widens to float32 exactly (a shift), so the products are the float32 products numba computes;
only the summation order differs. That IR is generic LLVM vector code (no instruction set named); the
*_dot variants do the same on AVX512-BF16's bfloat16 dot products (K and V not widened; V taken two
positions per product, their rows interleaved), for the CPUs that have them.
"""
from __future__ import annotations

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 16  # positions per score tile (the lanes of one float32 vector)
_F32, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16F, _V16I = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


def _lanes(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


def fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _maxnum(builder, a, b):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 2), "llvm.maxnum.v16f32")
    return builder.call(fn, [a, b])


def splat(builder, value, kind=_V16F):
    v = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _lanes([0] * 16))


def _bf16_row(builder, base, index, dim: int):
    """The bfloat16 row at base + index (elements, i16*) as dim / 16 float32 vectors."""
    ptr = builder.gep(base, [index])
    out = []
    for c in range(dim // 16):
        p = builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, 16 * c)]), ir.VectorType(_I16, 16).as_pointer())
        bits = builder.shl(builder.zext(builder.load(p, align=2), _V16I), ir.Constant(_V16I, [16] * 16))
        out.append(builder.bitcast(bits, _V16F))
    return out


def _f32_vectors(builder, base, count: int):
    return [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(_I64, 16 * c)]), _V16F.as_pointer()),
                         align=4) for c in range(count)]


def _fold(builder, a, b, level: int):
    """Two partial-sum vectors whose lanes hold 2^level positions' partials each -> one vector holding
    both sets (the positions of a first), each position's partials summed pairwise."""
    width = 8 >> level  # lanes per position after this fold
    lo, hi = [], []
    for start in range(0, 32, 2 * width):
        lo += range(start, start + width)
        hi += range(start + width, start + 2 * width)
    return builder.fadd(builder.shuffle_vector(a, b, _lanes(lo)), builder.shuffle_vector(a, b, _lanes(hi)))


def make_scores(dim: int, group: int, kv_heads: int):
    """scores(q, k, k_stride, n, out, out_stride, maxes, scale): for positions 0..n-1 (n <= 16), every query
    head's score q_h . k_p against its KV head's key. q: float32 address of [kv_heads * group, dim]
    (already scaled); k: bfloat16 address of position 0's row of all KV heads, position p at k + p *
    k_stride elements; out: float32 address of head 0's score for position 0, head h's at out + h *
    out_stride; all 16 lanes are written (positions from n on get 0), so each head's row needs room for
    16. maxes: float32 address of [heads, 16], each head's running lane-wise maximum over the tiles
    scored so far (lanes from n on left out), so the softmax needs no scalar pass for its maximum.
    Each position's row is read whole, in memory order."""
    return _scores_intrinsic(f"scores_{dim}_{group}_{kv_heads}", dim, group, kv_heads, dot=False)


def _scores_intrinsic(name: str, dim: int, group: int, kv_heads: int, dot: bool):
    """make_scores (dot False) or make_scores_dot (dot True): the same tiles, folds and maxima; the dot
    variant multiplies bfloat16 pairs, prefetches the rows ahead and scales the scores at the end."""
    heads = kv_heads * group

    def scores(typingctx, q, k, k_stride, n, out, out_stride, maxes, scale):
        sig = types.void(*([types.intp] * 7), types.float32)  # scale: used by the dot variant only

        def codegen(context, builder, signature, args):
            q_p = builder.inttoptr(args[0], _F32.as_pointer())
            k_p = builder.inttoptr(args[1], _I16.as_pointer())
            k_stride, n, out_stride = args[2], args[3], args[5]
            out_p = builder.inttoptr(args[4], _F32.as_pointer())
            max_p = builder.inttoptr(args[6], _F32.as_pointer())
            q_rows = [builder.gep(q_p, [ir.Constant(_I64, h * dim)]) for h in range(heads)]
            qs = [_q_pairs(builder, r, dim) if dot else _f32_vectors(builder, r, dim // 16) for r in q_rows]
            zero = ir.Constant(_V16F, [0.0] * 16)
            stacks = [[] for _ in range(heads)]  # per head: (level, vector) of folds not yet paired
            for p in range(TILE):
                slots = [cgutils.alloca_once_value(builder, zero) for _ in range(heads)]
                with builder.if_then(builder.icmp_signed("<", ir.Constant(_I64, p), n)):
                    at = builder.mul(k_stride, ir.Constant(_I64, p))
                    if dot:
                        ahead = builder.add(at, builder.mul(k_stride, ir.Constant(_I64, PREFETCH)))
                        _prefetch_row(builder, k_p, ahead, 2 * kv_heads * dim)
                    for kh in range(kv_heads):
                        index = builder.add(at, ir.Constant(_I64, kh * dim))
                        row = _bf16_pairs(builder, k_p, index, dim) if dot else _bf16_row(builder, k_p, index, dim)
                        for h in range(kh * group, (kh + 1) * group):
                            builder.store(_row_dot(builder, qs[h], row, dot), slots[h])
                for h in range(heads):
                    level, v = 0, builder.load(slots[h])
                    stack = stacks[h]
                    while stack and stack[-1][0] == level:
                        v = _fold(builder, stack.pop()[1], v, level)
                        level += 1
                    stack.append((level, v))
            lanes = builder.icmp_signed("<", _lanes(range(TILE)), splat(builder, builder.trunc(n, _I32), _V16I))
            low = ir.Constant(_V16F, [float("-inf")] * 16)
            for h in range(heads):
                (_, v), = stacks[h]
                v = builder.fmul(v, splat(builder, args[7])) if dot else v
                dst = builder.gep(out_p, [builder.mul(out_stride, ir.Constant(_I64, h))])
                builder.store(v, builder.bitcast(dst, _V16F.as_pointer()), align=4)
                running = builder.bitcast(builder.gep(max_p, [ir.Constant(_I64, h * TILE)]), _V16F.as_pointer())
                top = _maxnum(builder, builder.load(running, align=4), builder.select(lanes, v, low))
                builder.store(top, running, align=4)
            return context.get_dummy_value()
        return sig, codegen
    scores.__name__ = scores.__qualname__ = name
    return intrinsic(scores)


def _row_dot(builder, q, row, dot: bool):
    """One head's 16-lane partial sums of q . row: float32 multiply-adds, or bfloat16 pair products."""
    if dot:
        acc = ir.Constant(_V16F, [0.0] * 16)
        for qc, rc in zip(q, row):
            acc = _dot_bf16(builder, acc, qc, rc)
        return acc
    acc = builder.fmul(q[0], row[0])
    for qc, rc in zip(q[1:], row[1:]):
        acc = fma(builder, qc, rc, acc)
    return acc


def _accumulators(builder, acc_p, heads: int, dim: int):
    """Each head's accumulator row in acc_p [heads, dim] (float32), and its dim / 16 vectors held in
    stack slots (registers once optimized) for the loop."""
    rows = [builder.gep(acc_p, [ir.Constant(_I64, h * dim)]) for h in range(heads)]
    return rows, [[cgutils.alloca_once_value(builder, v) for v in _f32_vectors(builder, r, dim // 16)] for r in rows]


def _store_accumulators(builder, rows, accs) -> None:
    for row, slots in zip(rows, accs):
        for c, slot in enumerate(slots):
            dst = builder.gep(row, [ir.Constant(_I64, 16 * c)])
            builder.store(builder.load(slot), builder.bitcast(dst, _V16F.as_pointer()), align=4)


def make_accumulate(dim: int, group: int, kv_heads: int):
    """accumulate(p, p_stride, v, v_stride, n, acc): acc[h] += sum over positions i < n of p[h, i] * v_i
    for every query head h (its KV head's values). p: float32 address of head 0's weight for position 0,
    head h's at p + h * p_stride; v: bfloat16 address of position 0's row of all KV heads, position i at
    v + i * v_stride elements; acc: float32 address of [kv_heads * group, dim], read once and written
    once. Each position's row is read whole, in memory order."""
    chunks = dim // 16
    heads = kv_heads * group

    def accumulate(typingctx, p, p_stride, v, v_stride, n, acc):
        sig = types.void(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            p_p = builder.inttoptr(args[0], _F32.as_pointer())
            v_p = builder.inttoptr(args[2], _I16.as_pointer())
            p_stride, v_stride, n = args[1], args[3], args[4]
            acc_p = builder.inttoptr(args[5], _F32.as_pointer())
            rows, accs = _accumulators(builder, acc_p, heads, dim)
            with cgutils.for_range(builder, n) as loop:
                at = builder.mul(v_stride, loop.index)
                for kh in range(kv_heads):
                    row = _bf16_row(builder, v_p, builder.add(at, ir.Constant(_I64, kh * dim)), dim)
                    for h in range(kh * group, (kh + 1) * group):
                        where = builder.add(builder.mul(p_stride, ir.Constant(_I64, h)), loop.index)
                        w = splat(builder, builder.load(builder.gep(p_p, [where])))
                        for c in range(chunks):
                            builder.store(fma(builder, w, row[c], builder.load(accs[h][c])), accs[h][c])
            _store_accumulators(builder, rows, accs)
            return context.get_dummy_value()
        return sig, codegen
    accumulate.__name__ = accumulate.__qualname__ = f"accumulate_{dim}_{group}_{kv_heads}"
    return intrinsic(accumulate)


# bfloat16 dot products (AVX512-BF16's vdpbf16ps: each float32 lane += a[2i] * b[2i] + a[2i + 1] * b[2i + 1],
# the products exact, accumulated in float32), for CPUs that have them (cpu_attention.uses_dot). LLVM has
# the instruction as an intrinsic over a bfloat vector type llvmlite cannot spell: inline assembly here.
_V32S = ir.VectorType(_I16, 32)
binding.initialize_native_asmparser()  # numba's JIT reads inline assembly only with it


def _dot_bf16(builder, acc, a, b):
    """acc (16 x float) + the pairwise dot products of a and b (32 bfloat16 each, as 16 x i32)."""
    return builder.asm(ir.FunctionType(_V16F, [_V16I, _V16I, _V16F]), "vdpbf16ps $2, $1, $0", "=v,v,v,0",
                       [a, b, acc], False, name="dot")


PREFETCH = 16  # positions ahead that the dot kernels ask the memory for (0: none)


def _prefetch_row(builder, base, index, row_bytes: int):
    """Ask for the cache lines of the row at base + index (i16 elements) ahead of their use."""
    if not PREFETCH:
        return
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
        ir.IntType(8).as_pointer(), _I32, _I32, _I32]), "llvm.prefetch.p0")
    ptr = builder.bitcast(builder.gep(base, [index]), ir.IntType(8).as_pointer())
    for line in range(0, row_bytes, 64):
        at = builder.gep(ptr, [ir.Constant(_I64, line)])
        builder.call(fn, [at, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _bf16_pairs(builder, base, index, dim: int):
    """The bfloat16 row at base + index (elements, i16*) as dim / 32 vectors of bfloat16 pairs."""
    ptr = builder.gep(base, [index])
    return [builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(_I64, 32 * c)]), _V16I.as_pointer()),
                         align=2) for c in range(dim // 32)]


def _q_pairs(builder, q_p, dim: int):
    """A float32 query row that holds bfloat16 values (exactly) -> dim / 32 vectors of bfloat16 pairs."""
    out = []
    for c in range(dim // 32):
        halves = []
        for half in range(2):
            v = builder.load(builder.bitcast(builder.gep(q_p, [ir.Constant(_I64, 32 * c + 16 * half)]),
                                             _V16F.as_pointer()), align=4)
            bits = builder.lshr(builder.bitcast(v, _V16I), ir.Constant(_V16I, [16] * 16))
            halves.append(builder.trunc(bits, ir.VectorType(_I16, 16)))
        out.append(builder.bitcast(builder.shuffle_vector(halves[0], halves[1], _lanes(range(32))), _V16I))
    return out


def make_scores_dot(dim: int, group: int, kv_heads: int):
    """make_scores' contract on bfloat16 dot products, with two differences: q holds the query's own
    (bfloat16) values unscaled, and scale (float32) multiplies the scores (so the products stay exact
    whatever the scale). dim: a multiple of 32."""
    return _scores_intrinsic(f"scores_dot_{dim}_{group}_{kv_heads}", dim, group, kv_heads, dot=True)


# vpunpcklwd / vpunpckhwd of two rows' 32 bfloat16 values: each 128-bit lane's low (high) four pairs
_UNPACK = ([x for lane in range(4) for j in range(4) for x in (8 * lane + j, 32 + 8 * lane + j)],
           [x for lane in range(4) for j in range(4, 8) for x in (8 * lane + j, 32 + 8 * lane + j)])


def accumulator_dims(dim: int) -> list[int]:
    """Which value dimension each float32 lane of make_accumulate_dot's accumulator holds (the unpack order),
    lane by lane over its dim / 16 vectors."""
    out = []
    for c in range(dim // 32):
        for half in range(2):
            out += [32 * c + 8 * lane + 4 * half + j for lane in range(4) for j in range(4)]
    return out


def make_accumulate_dot(dim: int, group: int, kv_heads: int):
    """accumulate(p, p_stride, v, v_stride, n, acc) on bfloat16 dot products, two positions per product:
    p: bfloat16 (i16) address of head 0's weight for position 0 (head h's at p + h * p_stride), the weights
    of positions n and n + 1 readable (a weight past n is not used); acc: float32 [kv_heads * group, dim]
    in accumulator_dims order, read once and written once. dim: a multiple of 32."""
    chunks = dim // 32
    heads = kv_heads * group

    def accumulate(typingctx, p, p_stride, v, v_stride, n, acc):
        sig = types.void(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            p_p = builder.inttoptr(args[0], _I16.as_pointer())
            v_p = builder.inttoptr(args[2], _I16.as_pointer())
            p_stride, v_stride, n = args[1], args[3], args[4]
            acc_p = builder.inttoptr(args[5], _F32.as_pointer())
            rows, accs = _accumulators(builder, acc_p, heads, dim)
            zero_row = ir.Constant(_V32S, [0] * 32)
            pairs = builder.sdiv(builder.add(n, ir.Constant(_I64, 1)), ir.Constant(_I64, 2))
            with cgutils.for_range(builder, pairs) as loop:
                i = builder.mul(loop.index, ir.Constant(_I64, 2))
                has_second = builder.icmp_signed("<", builder.add(i, ir.Constant(_I64, 1)), n)
                first_at = builder.mul(v_stride, i)
                second_at = builder.add(first_at, v_stride)
                for ahead in (PREFETCH, PREFETCH + 1):
                    _prefetch_row(builder, v_p, builder.add(first_at, builder.mul(v_stride, ir.Constant(_I64, ahead))),
                                  2 * kv_heads * dim)
                for kh in range(kv_heads):
                    a_ptr = builder.gep(v_p, [builder.add(first_at, ir.Constant(_I64, kh * dim))])
                    b_ptr = builder.gep(v_p, [builder.add(second_at, ir.Constant(_I64, kh * dim))])
                    mixed = []
                    for c in range(chunks):
                        a = builder.load(builder.bitcast(builder.gep(a_ptr, [ir.Constant(_I64, 32 * c)]),
                                                         _V32S.as_pointer()), align=2)
                        b_at = builder.bitcast(builder.gep(b_ptr, [ir.Constant(_I64, 32 * c)]), _V32S.as_pointer())
                        b = _load_or(builder, has_second, b_at, zero_row)
                        mixed += [builder.bitcast(builder.shuffle_vector(a, b, _lanes(m)), _V16I) for m in _UNPACK]
                    for h in range(kh * group, (kh + 1) * group):
                        where = builder.add(builder.mul(p_stride, ir.Constant(_I64, h)), i)
                        w = builder.load(builder.bitcast(builder.gep(p_p, [where]), _I32.as_pointer()), align=2)
                        w = builder.select(has_second, w, builder.and_(w, ir.Constant(_I32, 0xFFFF)))
                        w = splat(builder, w, _V16I)
                        for x in range(2 * chunks):
                            builder.store(_dot_bf16(builder, builder.load(accs[h][x]), w, mixed[x]), accs[h][x])
            _store_accumulators(builder, rows, accs)
            return context.get_dummy_value()
        return sig, codegen
    accumulate.__name__ = accumulate.__qualname__ = f"accumulate_dot_{dim}_{group}_{kv_heads}"
    return intrinsic(accumulate)


def _load_or(builder, condition, ptr, default):
    """*ptr where condition holds, else default (the load is not made otherwise: past a row's end the
    memory may not be mapped)."""
    with builder.if_else(condition) as (then, otherwise):
        with then:
            block_then = builder.block
            loaded = builder.load(ptr, align=2)
        with otherwise:
            block_else = builder.block
    phi = builder.phi(default.type)
    phi.add_incoming(loaded, block_then)
    phi.add_incoming(default, block_else)
    return phi
