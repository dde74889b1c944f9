"""Vector code for GGUF's 32-element weight blocks (Q8_0, Q4_0, Q4_1), written as LLVM IR that numba
kernels call like functions (numba intrinsics).

numba types every integer expression on small ints as int64, so a loop that unpacks nibbles in
plain numba vectorizes to 8-lane int64 code, several times slower than this. Here a block is
unpacked in 16-lane float vectors: bytes -> nibbles -> float, times the block's float16 scale (plus
its minimum for Q4_1, minus 8 scales for Q4_0), then fused multiply-adds against float32 activations.
The IR is generic LLVM vector code, so it compiles for whatever CPU numba targets.

Layout (ops/quant/tensor.py): per weight row, `qs` holds each block's quantized bytes back to back
(16 for the 4-bit formats, low nibbles are elements 0-15 and high ones 16-31, as in GGUF; 32 signed
bytes for Q8_0), `d` the blocks' float16 scales and `m` Q4_1's float16 minimums.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

QUANT_BYTES = {"q8_0": 32, "q4_0": 16, "q4_1": 16}  # quantized bytes per 32-element block

_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16F = ir.VectorType(_F32, 16)


def _const_vec(values, elem=_I32):
    return ir.Constant(ir.VectorType(elem, len(values)), list(values))


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(ir.VectorType(value.type, 16), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _const_vec([0] * 16))


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _half_at(builder, base, index):
    """base: i8* to float16 values; the index-th as float32."""
    ptr = builder.bitcast(builder.gep(base, [builder.mul(index, ir.Constant(_I64, 2))]), _I16.as_pointer())
    return builder.fpext(builder.bitcast(builder.load(ptr, align=2), ir.HalfType()), _F32)


def _hsum(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, _const_vec(range(n))),
                         builder.shuffle_vector(v, v, _const_vec(range(n, 2 * n))))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _unpack(builder, fmt: str, qs, d, mins, b):
    """Block b of a row -> (elements 0-15, elements 16-31) as float vectors."""
    scale = _half_at(builder, d, b)
    lo, hi = _quants(builder, fmt, qs, b)
    sv = _splat(builder, scale)
    if fmt == "q8_0":
        return builder.fmul(lo, sv), builder.fmul(hi, sv)
    offset = _splat(builder, _offset(builder, fmt, scale, mins, b))
    return _fma(builder, lo, sv, offset), _fma(builder, hi, sv, offset)


def _quants(builder, fmt: str, qs, b):
    """Block b's quantized values as float vectors (elements 0-15, 16-31), before scale and offset."""
    qp = builder.gep(qs, [builder.mul(b, ir.Constant(_I64, QUANT_BYTES[fmt]))])
    if fmt == "q8_0":
        q = builder.load(builder.bitcast(qp, ir.VectorType(_I8, 32).as_pointer()), align=1)
        qf = builder.sitofp(q, ir.VectorType(_F32, 32))
        return (builder.shuffle_vector(qf, qf, _const_vec(range(16))),
                builder.shuffle_vector(qf, qf, _const_vec(range(16, 32))))
    q = builder.load(builder.bitcast(qp, ir.VectorType(_I8, 16).as_pointer()), align=1)
    return (builder.uitofp(builder.and_(q, _const_vec([15] * 16, _I8)), _V16F),
            builder.uitofp(builder.lshr(q, _const_vec([4] * 16, _I8)), _V16F))


def _offset(builder, fmt: str, scale, mins, b):
    """The 4-bit formats' per-block term added to scale * q: -8 * scale (Q4_0) or the minimum (Q4_1)."""
    if fmt == "q4_0":
        return builder.fmul(scale, ir.Constant(_F32, -8.0))
    return _half_at(builder, mins, b)


def _pointers(builder, qs, d, mins):
    u8 = _I8.as_pointer()
    return builder.inttoptr(qs, u8), builder.inttoptr(d, u8), builder.inttoptr(mins, u8)


def make_row_dot(fmt: str, rows: int):
    """row_dot(qs, d, m, x, x_stride, xsum, unused, nb) -> `rows` float32 dot products of one weight row
    (addresses qs, d, m) with rows x, x + x_stride, ... (float32 address, stride in elements) over nb
    blocks; xsum: the float32 sums of each x row's 32-element blocks ([rows, nb], unused for Q8_0). The
    unused argument gives it make_row_dot_i8's signature, so one kernel drives both.

    Per block, the quantized values times x are summed in a vector, then scaled once by the block's
    scale; the 4-bit formats' offset term is the offset times the x block's sum (one scalar per block).
    Each x row keeps two vector accumulators (even and odd blocks) so the adds overlap."""
    def row_dot(typingctx, qs, d, m, x, x_stride, xsum, unused, nb):
        sig = types.UniTuple(types.float32, rows)(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            qs_p, d_p, m_p = _pointers(builder, *args[:3])
            x_p = builder.inttoptr(args[3], _F32.as_pointer())
            xsum_p = builder.inttoptr(args[5], _F32.as_pointer())
            x_stride, nb = args[4], args[7]
            zero = ir.Constant(_V16F, [0.0] * 16)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(rows)]
            offs = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(rows)]

            def block(b, parity):
                scale = _half_at(builder, d_p, b)
                sv = _splat(builder, scale)
                lo, hi = _quants(builder, fmt, qs_p, b)
                off = None if fmt == "q8_0" else _offset(builder, fmt, scale, m_p, b)
                base = builder.mul(b, ir.Constant(_I64, 32))
                for t in range(rows):
                    row = builder.gep(x_p, [builder.add(base, builder.mul(x_stride, ir.Constant(_I64, t)))])
                    x_lo = builder.load(builder.bitcast(row, _V16F.as_pointer()), align=4)
                    x_hi = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(_I64, 16)]), _V16F.as_pointer()),
                                        align=4)
                    part = _fma(builder, hi, x_hi, builder.fmul(lo, x_lo))
                    acc = accs[t][parity]
                    builder.store(_fma(builder, sv, part, builder.load(acc)), acc)
                    if off is not None:
                        sum_index = builder.add(b, builder.mul(nb, ir.Constant(_I64, t)))
                        s = builder.load(builder.gep(xsum_p, [sum_index]))
                        builder.store(builder.fadd(builder.load(offs[t]), builder.fmul(off, s)), offs[t])

            pairs = builder.lshr(nb, ir.Constant(_I64, 1))
            with cgutils.for_range(builder, pairs) as loop:
                b = builder.mul(loop.index, ir.Constant(_I64, 2))
                block(b, 0)
                block(builder.add(b, ir.Constant(_I64, 1)), 1)
            odd = builder.icmp_unsigned("!=", builder.and_(nb, ir.Constant(_I64, 1)), ir.Constant(_I64, 0))
            with builder.if_then(odd):
                block(builder.sub(nb, ir.Constant(_I64, 1)), 0)
            sums = [builder.fadd(_hsum(builder, builder.fadd(*[builder.load(p) for p in accs[t]])),
                                 builder.load(offs[t])) for t in range(rows)]
            return context.make_tuple(builder, signature.return_type, sums)
        return sig, codegen
    row_dot.__name__ = row_dot.__qualname__ = f"row_dot_{fmt}_{rows}"
    return intrinsic(row_dot)


@intrinsic
def half_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return types.float32(types.uint16), codegen


def make_dequant_row(fmt: str):
    """dequant_row(qs, d, m, out, nb): one weight row's nb blocks -> out (float32 address)."""
    def dequant_row(typingctx, qs, d, m, out, nb):
        sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            qs_p, d_p, m_p = _pointers(builder, *args[:3])
            out_p = builder.inttoptr(args[3], _F32.as_pointer())
            with cgutils.for_range(builder, args[4]) as loop:
                lo, hi = _unpack(builder, fmt, qs_p, d_p, m_p, loop.index)
                row = builder.gep(out_p, [builder.mul(loop.index, ir.Constant(_I64, 32))])
                builder.store(lo, builder.bitcast(row, _V16F.as_pointer()), align=4)
                builder.store(hi, builder.bitcast(builder.gep(row, [ir.Constant(_I64, 16)]), _V16F.as_pointer()),
                              align=4)
            return context.get_dummy_value()
        return sig, codegen
    dequant_row.__name__ = dequant_row.__qualname__ = f"dequant_row_{fmt}"
    return intrinsic(dequant_row)


# ---- int8 dot products (AVX512-VNNI) --------------------------------------------------------------
# Where the CPU has VNNI, activations are quantized per 32-element block to int8 (scale = max|x| / 127,
# as llama.cpp quantizes activations for these formats) and blocks are multiplied with `vpdpbusd`
# (unsigned bytes times signed bytes, summed in fours into eight int32 lanes per block) instead of
# float unpacking.

_V8F = ir.VectorType(_F32, 8)


def _vpdpbusd(builder, acc, unsigned, signed):
    """acc plus the products of unsigned and signed bytes summed in fours (8 or 16 int32 lanes)."""
    lanes = acc.type.count
    vec = ir.VectorType(_I32, lanes)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3),
                                        f"llvm.x86.avx512.vpdpbusd.{32 * lanes}")
    return builder.call(fn, [acc, builder.bitcast(unsigned, vec), builder.bitcast(signed, vec)])


def _splat8(builder, value):
    v = builder.insert_element(ir.Constant(_V8F, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _const_vec([0] * 8))


def _fma8(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F, [_V8F] * 3), "llvm.fma.v8f32")
    return builder.call(fn, [a, b, c])


def _weight_blocks(builder, fmt: str, qs_p, b, count: int):
    """`count` (1 or 2) blocks of a weight row from block b as 32 * count bytes, block after block (a 4-bit
    block's low nibbles, then its high ones, as GGUF orders its elements), and for Q8_0 128 x their sums
    in fours (8 * count int32 lanes)."""
    if fmt == "q8_0":
        qp = builder.gep(qs_p, [builder.mul(b, ir.Constant(_I64, 32))])
        w = builder.load(builder.bitcast(qp, ir.VectorType(_I8, 32 * count).as_pointer()), align=1)
        zero = ir.Constant(ir.VectorType(_I32, 8 * count), [0] * 8 * count)
        w_sum = _vpdpbusd(builder, zero, ir.Constant(w.type, [1] * 32 * count), w)
        return w, builder.shl(w_sum, ir.Constant(w_sum.type, [7] * 8 * count))
    n = 16 * count
    qp = builder.gep(qs_p, [builder.mul(b, ir.Constant(_I64, 16))])
    q = builder.load(builder.bitcast(qp, ir.VectorType(_I8, n).as_pointer()), align=1)
    lo = builder.and_(q, _const_vec([15] * n, _I8))
    hi = builder.lshr(q, _const_vec([4] * n, _I8))
    order = []
    for blk in range(count):  # the shuffle numbers lo's bytes 0..n-1 and hi's n..2n-1
        order += [*range(16 * blk, 16 * blk + 16), *range(n + 16 * blk, n + 16 * blk + 16)]
    return builder.shuffle_vector(lo, hi, _const_vec(order)), None


def make_row_dot_i8(fmt: str, rows: int):
    """row_dot_i8(qs, d, m, xq, x_stride, xd, xo, nb) -> `rows` float32 dot products of one weight row
    with rows of int8 activations: xq (int8 blocks, biased by +128 as unsigned bytes for Q8_0; stride in
    bytes between rows), xd (each block's float32 scale, [rows, nb]), xo (each block's scale times its
    sum of quantized values, [rows, nb]: the 4-bit formats' offset term).

    Blocks go eight at a time: their float16 scales (and Q4_1's minimums) are widened in one vector and
    multiplied by the activations' eight scales at once; the offset terms are one vector multiply-add per
    eight blocks; then two blocks per 512-bit `vpdpbusd`, whose lanes (eight per block) are scaled by a
    vector holding the two blocks' scales, into one accumulator per x row whose halves gather the even
    and the odd blocks. Leftover blocks go one by one (256-bit) into the even half. Each lane sums its
    blocks in the order of two 8-lane accumulators (even and odd blocks), as a block at a time did: with
    int8 activations a last-bit change can move a whole rounding step downstream, and the bundled model's
    greedy answer to the Paris question is a near tie that another order flipped."""
    def row_dot_i8(typingctx, qs, d, m, xq, x_stride, xd, xo, nb):
        sig = types.UniTuple(types.float32, rows)(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            qs_p, d_p, m_p = _pointers(builder, *args[:3])
            xq_p = builder.inttoptr(args[3], _I8.as_pointer())
            xd_p = builder.inttoptr(args[5], _F32.as_pointer())
            xo_p = builder.inttoptr(args[6], _F32.as_pointer())
            x_stride, nb = args[4], args[7]
            zero_f = ir.Constant(_V8F, [0.0] * 8)
            accs = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(2)] for _ in range(rows)]
            offs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(rows)]
            pairs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(rows)]

            def blocks(b, count, scales, targets):
                """`count` (1 or 2) blocks from b into each x row's accumulator targets[t]; scales[t]: the
                blocks' weight scales times row t's activation scales, eight lanes per block."""
                w, bias = _weight_blocks(builder, fmt, qs_p, b, count)
                zero = ir.Constant(ir.VectorType(_I32, 8 * count), [0] * 8 * count)
                floats, fma = ir.VectorType(_F32, 8 * count), (_fma8 if count == 1 else _fma)
                for t in range(rows):
                    row = builder.mul(x_stride, ir.Constant(_I64, t))
                    xp = builder.gep(xq_p, [builder.add(row, builder.mul(b, ir.Constant(_I64, 32)))])
                    x = builder.load(builder.bitcast(xp, ir.VectorType(_I8, 32 * count).as_pointer()), align=1)
                    if bias is not None:
                        dot = builder.sub(_vpdpbusd(builder, zero, x, w), bias)
                    else:
                        dot = _vpdpbusd(builder, zero, w, x)
                    acc = targets[t]
                    builder.store(fma(builder, builder.sitofp(dot, floats), scales[t], builder.load(acc)), acc)

            def vec8(base, at):
                return builder.load(builder.bitcast(builder.gep(base, [at]), _V8F.as_pointer()), align=4)

            def halves8(base, b):
                ptr = builder.bitcast(builder.gep(base, [builder.mul(b, ir.Constant(_I64, 2))]),
                                      ir.VectorType(ir.HalfType(), 8).as_pointer())
                return builder.fpext(builder.load(ptr, align=2), _V8F)

            with cgutils.for_range(builder, builder.lshr(nb, ir.Constant(_I64, 3))) as loop:
                b0 = builder.mul(loop.index, ir.Constant(_I64, 8))
                d8 = halves8(d_p, b0)
                off8 = None
                if fmt == "q4_0":
                    off8 = builder.fmul(d8, ir.Constant(_V8F, [-8.0] * 8))
                elif fmt == "q4_1":
                    off8 = halves8(m_p, b0)
                products = []
                for t in range(rows):
                    at = builder.add(b0, builder.mul(nb, ir.Constant(_I64, t)))
                    products.append(builder.fmul(d8, vec8(xd_p, at)))
                    if off8 is not None:
                        builder.store(_fma8(builder, off8, vec8(xo_p, at), builder.load(offs[t])), offs[t])
                for j in range(4):
                    scales = [builder.shuffle_vector(p, p, _const_vec([2 * j] * 8 + [2 * j + 1] * 8))
                              for p in products]
                    blocks(builder.add(b0, ir.Constant(_I64, 2 * j)), 2, scales, pairs)
            for t in range(rows):  # the halves: even blocks so far, odd blocks
                both = builder.load(pairs[t])
                builder.store(builder.shuffle_vector(both, both, _const_vec(range(8))), accs[t][0])
                builder.store(builder.shuffle_vector(both, both, _const_vec(range(8, 16))), accs[t][1])
            done = builder.and_(nb, ir.Constant(_I64, ~7))
            with cgutils.for_range(builder, builder.sub(nb, done)) as loop:
                b = builder.add(done, loop.index)
                scale = _half_at(builder, d_p, b)
                lane = []
                for t in range(rows):
                    at = builder.add(b, builder.mul(nb, ir.Constant(_I64, t)))
                    lane.append(_splat8(builder, builder.fmul(scale, builder.load(builder.gep(xd_p, [at])))))
                    if fmt != "q8_0":
                        off = _offset(builder, fmt, scale, m_p, b) if fmt == "q4_1" else \
                            builder.fmul(scale, ir.Constant(_F32, -8.0))
                        term = builder.fmul(off, builder.load(builder.gep(xo_p, [at])))
                        first = builder.insert_element(zero_f, term, ir.Constant(_I32, 0))
                        builder.store(builder.fadd(builder.load(offs[t]), first), offs[t])
                blocks(b, 1, lane, [a[0] for a in accs])
            sums = []
            for t in range(rows):
                v = builder.fadd(builder.fadd(builder.load(accs[t][0]), builder.load(accs[t][1])),
                                 builder.load(offs[t]))
                sums.append(_hsum(builder, v))
            return context.make_tuple(builder, signature.return_type, sums)
        return sig, codegen
    row_dot_i8.__name__ = row_dot_i8.__qualname__ = f"row_dot_i8_{fmt}_{rows}"
    return intrinsic(row_dot_i8)


def host_has_vnni() -> bool:
    """Whether the CPU numba compiles for has AVX512-VNNI with 256-bit forms (AVX512VL)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512vl"))


# ---- Q4_0 and Q8_0 in groups of 16 rows (AVX512-VNNI) ----------------------------------------------
# quant_tensor.QuantizedTensor.grouped() lays each block of 16 weight rows out as 64-byte vectors whose
# 32-bit lane r holds four bytes of row r, and the 16 rows' float16 scales side by side. Q4_0: four
# vectors (bytes 4i..4i+3 of a row's 16: elements 4i..4i+3 in the low nibbles, 16+4i..16+4i+3 in the
# high ones). Q8_0: eight vectors (elements 4i..4i+3), each byte stored plus 128 as an unsigned byte. One
# `vpdpbusd` with four activation bytes broadcast to every lane then advances all 16 rows' dot products,
# which end each block in the lanes of their rows: no horizontal sums, and the scales are one vector.

GROUP_ROWS = 16
GROUPED_FORMATS = ("q8_0", "q4_0")  # a block of a group: QUANT_BYTES / 4 vectors of 64 bytes


def make_grouped_dot(fmt: str, rows: int):
    """grouped_dot(qs, d, xq, x_stride, xd, xo, nb, out): one group's 16 weight rows (qs: its blocks, 16 *
    QUANT_BYTES[fmt] bytes each; d: 16 float16 scales per block) dotted with `rows` rows of signed int8
    activations (xq, stride in bytes; xd: the blocks' scales, [rows, nb]; xo: for Q4_0 each block's scale
    times its sum of quantized values, for Q8_0 that sum alone) -> out (float32 address): rows x 16
    results, row-major.

    Per block and row: the exact integer dot of the 16 weight rows, then added to a float accumulator per
    row (blocks in order) as Q4_0: d_w * (xd * dot - 8 * xo); Q8_0: d_w * (xd * (dot - 128 * xo)), where
    the difference of the two integers (each below 2^24) is exact in float32."""
    vectors = QUANT_BYTES[fmt] // 4

    def grouped_dot(typingctx, qs, d, xq, x_stride, xd, xo, nb, out):
        sig = types.void(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            u8 = _I8.as_pointer()
            qs_p, d_p, xq_p = (builder.inttoptr(a, u8) for a in args[:3])
            xd_p, xo_p = (builder.inttoptr(a, _F32.as_pointer()) for a in args[4:6])
            x_stride, nb = args[3], args[6]
            out_p = builder.inttoptr(args[7], _F32.as_pointer())
            v64 = ir.VectorType(_I8, 64)
            v16i = ir.VectorType(_I32, 16)
            zero_i = ir.Constant(v16i, [0] * 16)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(rows)]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                base = builder.gep(qs_p, [builder.mul(b, ir.Constant(_I64, 64 * vectors))])
                chunks = [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(_I64, 64 * i)]),
                                                       v64.as_pointer()), align=1) for i in range(vectors)]
                if fmt == "q4_0":  # (vector, activation word) pairs: low nibbles are words 0-3, high 4-7
                    pairs = [(builder.and_(c, _const_vec([15] * 64, _I8)), i) for i, c in enumerate(chunks)]
                    pairs += [(builder.lshr(c, _const_vec([4] * 64, _I8)), 4 + i) for i, c in enumerate(chunks)]
                else:
                    pairs = list(zip(chunks, range(8)))
                dp = builder.bitcast(builder.gep(d_p, [builder.mul(b, ir.Constant(_I64, 32))]),
                                     ir.VectorType(ir.HalfType(), 16).as_pointer())
                dw = builder.fpext(builder.load(dp, align=2), _V16F)
                for t in range(rows):
                    row = builder.add(builder.mul(x_stride, ir.Constant(_I64, t)),
                                      builder.mul(b, ir.Constant(_I64, 32)))
                    xp = builder.bitcast(builder.gep(xq_p, [row]), _I32.as_pointer())
                    dots = [zero_i, zero_i]
                    for j, (vec, word_at) in enumerate(pairs):
                        word = builder.load(builder.gep(xp, [ir.Constant(_I64, word_at)]), align=1)
                        splat = builder.shuffle_vector(
                            builder.insert_element(ir.Constant(v16i, ir.Undefined), word, ir.Constant(_I32, 0)),
                            ir.Constant(v16i, ir.Undefined), _const_vec([0] * 16))
                        dots[j % 2] = _vpdpbusd(builder, dots[j % 2], vec, splat)
                    dot = builder.sitofp(builder.add(dots[0], dots[1]), _V16F)
                    at = builder.add(builder.mul(nb, ir.Constant(_I64, t)), b)
                    xd_b = _splat(builder, builder.load(builder.gep(xd_p, [at])))
                    xo_b = builder.load(builder.gep(xo_p, [at]))
                    if fmt == "q4_0":
                        block = _fma(builder, dot, xd_b, _splat(builder, builder.fmul(xo_b, ir.Constant(_F32, -8.0))))
                    else:
                        exact = builder.fadd(dot, _splat(builder, builder.fmul(xo_b, ir.Constant(_F32, -128.0))))
                        block = builder.fmul(exact, xd_b)
                    builder.store(_fma(builder, dw, block, builder.load(accs[t])), accs[t])
            for t in range(rows):
                ptr = builder.bitcast(builder.gep(out_p, [ir.Constant(_I64, 16 * t)]), _V16F.as_pointer())
                builder.store(builder.load(accs[t]), ptr, align=4)
            return context.get_dummy_value()
        return sig, codegen
    grouped_dot.__name__ = grouped_dot.__qualname__ = f"grouped_dot_{fmt}_{rows}"
    return intrinsic(grouped_dot)
