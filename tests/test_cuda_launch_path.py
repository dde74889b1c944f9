"""The GPU launch path of scalellm/ops/cuda/backend.py builds its CuPy objects once: a kernel handle per
(module, kernel), a stream object per torch stream handle, and no array wrapper at all (each tensor goes in
as its raw device pointer, an 8-byte np.uint64). Driven without a GPU: a fake `cupy` counts what is built,
its kernels record their launches, and the wrappers take CPU tensors with the GPU branch forced."""
import collections
import sys
import types

import numpy as np
import pytest
import torch

from scalellm.ops.cuda import backend as cb

HANDLE = 0x7F00BEEF  # the "current stream" the launches see


@pytest.fixture
def fake_cupy(monkeypatch):
    counts: collections.Counter = collections.Counter()
    launches: list = []

    class Function:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            launches.append(types.SimpleNamespace(name=self.name, grid=grid, block=block, args=args,
                                                  shared_mem=shared_mem, stream=stream))

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            counts["RawModule"] += 1
            self.names = list(name_expressions)

        def get_function(self, name):
            counts["get_function"] += 1
            assert name in self.names, name
            return Function(name)

    class ExternalStream:
        def __init__(self, ptr, device_id=-1):
            counts["ExternalStream"] += 1
            self.ptr = ptr

    def asarray(x, *a, **k):
        counts["asarray"] += 1
        return x

    fake = types.ModuleType("cupy")
    fake.RawModule, fake.asarray = RawModule, asarray
    fake.cuda = types.SimpleNamespace(ExternalStream=ExternalStream)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cb, "_on_host", lambda t: False)  # the GPU branch, for CPU tensors
    handle = {"now": HANDLE}
    monkeypatch.setattr(cb, "_stream_handle", lambda: handle["now"])
    cb.clear_caches()
    yield counts, launches, handle
    cb.clear_caches()  # no fake modules, functions or streams outlive the test


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


def ints(*shape, high=4, dtype=torch.int32):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(7)).to(dtype)


# Each case calls one wrapper and returns, per launch it makes, {argument index: the tensor that must be there}.
def rms_norm():
    x, w = randn(3, 64), randn(64)
    return [{0: cb.rms_norm(x, w, 1e-6), 1: x, 2: w}]


def add_rms_norm():
    x, r, w = randn(3, 64), randn(3, 64), randn(64)
    out, res = cb.add_rms_norm(x, r, w, 1e-6)
    return [{0: out, 1: res, 2: x, 3: w}]


def silu_mul():
    x = randn(3, 128)
    return [{0: cb.silu_mul(x), 1: x}]


def rotary_inplace():
    qkv, pos, cos, sin = randn(2, 8 * 64), ints(2, dtype=torch.int64), randn(16, 64), randn(16, 64)
    q, k = qkv[:, :4 * 64].view(2, 4, 64), qkv[:, 4 * 64:6 * 64].view(2, 2, 64)  # views: offset pointers
    cb.rotary_inplace(q, k, pos, cos, sin)
    return [{0: q, 1: k, 2: pos, 3: cos, 4: sin}]


def write_kv():
    k, v, kc, vc = randn(5, 2, 64), randn(5, 2, 64), randn(4, 4, 2, 64), randn(4, 4, 2, 64)
    slots = torch.tensor([3, -1, 0, 7, 9])
    cb.write_kv(k, v, kc, vc, slots)
    return [{0: k, 1: v, 2: kc, 3: vc, 4: slots}]


def qkv_prep():
    qkv, pos = randn(3, 8 * 64, dtype=torch.bfloat16), ints(3, dtype=torch.int64)
    cos, sin = randn(16, 64), randn(16, 64)
    kc, vc, qn, kn = randn(4, 4, 2, 64), randn(4, 4, 2, 64), randn(64), randn(64)
    slots = torch.tensor([5, -1, 2])
    q = cb.qkv_prep(qkv, pos, cos, sin, qn, kn, 1e-6, 4, 2, kc, vc, slots)
    return [{0: q, 1: kc, 2: vc, 3: qkv, 4: pos, 5: cos, 6: sin, 7: qn, 8: kn, 9: slots}]


def fused_sample():
    from dataclasses import fields

    from scalellm.ops.sampling_batch import SamplingBatch

    logits = randn(2, 50)
    batch = types.SimpleNamespace(**{f.name: ints(3) for f in fields(SamplingBatch)})
    tokens, chosen, top_ids, top_lp = cb.fused_sample(logits, batch, max_top=2)
    return [{0: tokens, 1: chosen, 2: top_ids, 3: top_lp, 5: logits,
             "among": [getattr(batch, f.name) for f in fields(SamplingBatch)]}]  # the batch's fields, in its order


def apply_token_bitmask():
    logits, rows, mask = randn(3, 64, dtype=torch.float16), torch.tensor([2, 0], dtype=torch.int32), ints(2, 2)
    cb.apply_token_bitmask(logits, rows, mask)
    return [{0: logits, 1: rows, 2: mask}]


def moe():
    logits, x = randn(5, 8), randn(5, 64)
    weights, ids, counts = cb.moe_route(logits, 2, True)
    offsets, slot_of_pair, token_of_slot = cb.moe_permute(ids, counts)
    rows = cb.moe_gather(x, token_of_slot)
    out = cb.moe_combine(rows, slot_of_pair, ids, weights)
    return [{0: weights, 1: ids, 2: counts, 3: logits}, {0: offsets, 2: counts},
            {0: slot_of_pair, 1: token_of_slot, 3: ids}, {0: rows, 1: x, 2: token_of_slot},
            {0: out, 1: rows, 2: slot_of_pair, 3: ids, 4: weights}]


def quant():
    x, qs, d = randn(2, 64), ints(8, 2, 32, dtype=torch.uint8), randn(8, 2, dtype=torch.float16)
    out, ids = torch.empty(2, 8), torch.tensor([1, 0, 5])
    cb.quant_gemm("q8_0", x, qs, d, None, None, None, out)
    rows = cb.dequant_rows("q8_0", qs, d, None, ids, torch.float32)
    return [{0: out, 1: x, 2: qs, 3: d, 4: d, 5: x, 6: out}, {0: rows, 1: qs, 2: d, 3: d, 4: ids}]


CASES = [rms_norm, add_rms_norm, silu_mul, rotary_inplace, write_kv, qkv_prep, fused_sample, apply_token_bitmask,
         moe, quant]


def check_launch(launch, expected: dict, stream_ptr: int) -> None:
    assert not any(isinstance(a, torch.Tensor) for a in launch.args), f"{launch.name}: a tensor object passed"
    pointers = {int(a) for a in launch.args if type(a) is np.uint64}
    for t in expected.pop("among", []):
        assert t.data_ptr() in pointers, f"{launch.name}: a tensor's data pointer is not among the arguments"
    for i, t in expected.items():
        a = launch.args[i]
        assert type(a) is np.uint64 and a.nbytes == 8, f"{launch.name} argument {i}: {type(a).__name__}"
        assert int(a) == t.data_ptr(), f"{launch.name} argument {i} is not the tensor's data pointer"
    assert launch.stream is not None and launch.stream.ptr == stream_ptr


def test_gpu_launches_build_their_cupy_objects_once_and_pass_raw_pointers(fake_cupy):
    counts, launches, _ = fake_cupy
    first_round = None
    for round_ in range(3):
        for case in CASES:
            start = len(launches)
            expected = case()
            made = launches[start:]
            assert len(made) == len(expected), f"{case.__name__}: {len(made)} launches"
            for launch, want in zip(made, expected):
                check_launch(launch, want, HANDLE)
        assert counts["asarray"] == 0, "a launch wrapped a tensor in a CuPy array"
        if first_round is None:
            first_round = dict(counts)
            kernels = {launch.name for launch in launches}
            assert counts["get_function"] == len(kernels), "a kernel handle was built twice in the first round"
            assert counts["ExternalStream"] == 1
            assert counts["RawModule"] == len({"rms_norm", "activation", "rotary", "kv_write", "qkv_prep", "sampling",
                                                "token_bitmask", "moe_routing", "quant_gemm"})
        else:
            assert dict(counts) == first_round, (
                f"round {round_}: launches after the first built CuPy objects: {dict(counts)} vs {first_round}")
    streams = {id(launch.stream) for launch in launches}
    assert len(streams) == 1, "every launch on one torch stream shares one stream object"


def test_one_stream_object_per_torch_stream_handle(fake_cupy):
    counts, launches, handle = fake_cupy
    for now in (HANDLE, HANDLE + 16, HANDLE, HANDLE + 16, 0):
        handle["now"] = now
        rms_norm()
        assert launches[-1].stream.ptr == now
    assert counts["ExternalStream"] == 3 and counts["get_function"] == 1 and counts["asarray"] == 0
