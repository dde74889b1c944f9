"""The CUDA step's shape, held without a GPU: on the kernels' host build, one step of each kind is counted
(tests/step_counter.py) against its budget of kernel launches, compute ops, copies each way and host
syncs, and greedy (and seeded) outputs are token-identical between the CPU path and the CUDA path, with
steps synchronous and one step ahead, for every kind of step.

Kinds of step: a decode batch replayed whole from a graph with greedy sampling ("greedy") or the fused
sampling kernel ("sample"); a graphed forward pass sampled after it ("forward": logprobs, logits
processors); piecewise graphs (attention between the pieces) for a decode batch above the decode graphs'
sizes, a mixed prefill and decode step and a step of prefill chunks; and a mixture-of-experts step
(piecewise, the sparse MLPs between the pieces).
"""
from __future__ import annotations

import collections

import pytest

from scalellm import ops
from scalellm.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.model_runner import ModelRunner
from scalellm.sampling_params import SamplingParams
from scalellm.structured import StructuredOutputsParams
from tests.checkpoints import build_checkpoint
from tests.cuda_kernel_checks import engines_on_cuda, gpu, host
from tests.step_counter import count_steps

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, top_k=30, seed=11, max_tokens=40, ignore_eos=True)
LOGPROBS = SamplingParams(temperature=0, logprobs=2, max_tokens=40, ignore_eos=True)
REGEX = SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex="[a-e ]{4,40}"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("step")), seed=5, hidden_size=256, head_dim=64)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return build_checkpoint("qwen2_moe", str(tmp_path_factory.mktemp("step-moe")), seed=5, hidden_size=256,
                            head_dim=64)


def new_engine(folder, **kw) -> LLMEngine:
    kw = {"async_scheduling": False, "cuda_graph_max_batch": 4, **kw}
    return LLMEngine(EngineConfig(model=folder, dtype="float32", block_size=16, num_kv_blocks=64, **kw))


def decoding(engine: LLMEngine, params: SamplingParams, n: int) -> None:
    """n requests past their prefill: the next step is a decode step of n rows."""
    for i in range(n):
        engine.add_request(f"r{i}", [1, 2, 3 + i, 4 + i], params)
    engine.step()
    engine.step()


# kind -> (requests, rows, budget): "replays" of graphs, device "launches" outside graphs (kernels and torch
# ops), "nodes" inside graphs (per layer, fixed), copies each way. A graphed decode layer is 10 nodes: norm,
# qkv GEMM, the qkv/rotary/KV-write kernel, decode attention and its reduce, output GEMM onto the
# residual, norm, gate_up GEMM, SiLU-mul, down GEMM onto the residual.
BUDGETS = {
    # one copy in, one replay (ids in flight gathered, embedding, layers, final norm, LM head, draw, ids
    # stored), the ids' copy out
    "greedy": (GREEDY, 3, dict(replays=lambda n: 1, launches=(0, 1), nodes=(10, 9), h2d=1, d2h=1)),
    "sample": (SEEDED, 3, dict(replays=lambda n: 1, launches=(0, 1), nodes=(10, 9), h2d=1, d2h=1)),
    # a grammar's masks written by the host into the same copy, applied in the graph (one node more)
    "greedy-masked": (REGEX, 3, dict(replays=lambda n: 1, launches=(0, 1), nodes=(10, 10), h2d=1, d2h=1)),
    # the graph stops at the forward pass; the sampler copies its rows over and reads 3 logprob arrays back
    "forward": (LOGPROBS, 3, dict(replays=lambda n: 1, launches=(0, 5), nodes=(10, 5), h2d=2, d2h=4)),
    # above the decode graphs: piecewise, attention between the pieces
    "piecewise": (GREEDY, 6, dict(replays=lambda n: n + 1, launches=(1, 8), nodes=(10, 6), h2d=1, d2h=1)),
}


@host
@pytest.mark.parametrize("kind", list(BUDGETS))
def test_decode_steps_keep_their_budgets(folder, kind, monkeypatch):
    params, rows, budget = BUDGETS[kind]
    modes = []
    graph_mode = ModelRunner.graph_mode
    monkeypatch.setattr(ModelRunner, "graph_mode", lambda self, *a: modes.append(graph_mode(self, *a)) or modes[-1])
    with ops.cuda_kernels_on_cpu():
        engine = new_engine(folder)
        decoding(engine, params, rows)
        modes.clear()
        with count_steps() as steps:
            engine.step()
    layers = engine.model_config.num_layers
    assert [m and m[0] for m in modes] == [None if kind == "piecewise" else kind]
    got = steps.summary()
    print(kind, got, f"{layers} layers")
    assert got["replays"] == budget["replays"](layers), got
    for key, have in (("launches", got["launches"]), ("nodes", got["graph_nodes"])):
        per_layer, fixed = budget[key]
        assert have <= per_layer * layers + fixed, (key, got)
    assert got["h2d"] == budget["h2d"] and got["d2h"] == budget["d2h"], got
    assert got["syncs"] == 0, steps.syncs


@host
def test_mixed_and_prefill_steps_run_piecewise_copy_once_each_way_and_never_sync(folder):
    with ops.cuda_kernels_on_cpu():
        engine = new_engine(folder)
        engine.add_request("prompt", list(range(1, 40)), GREEDY)
        with count_steps() as prefill:
            engine.step()
        engine.add_request("another", list(range(3, 30)), GREEDY)
        with count_steps() as mixed:
            engine.step()
    layers = engine.model_config.num_layers
    # outside the pieces: the inputs into the pieces' buffers, each layer's attention (a mixed step's two
    # kernels, writing into the pieces' buffer), the rows sampled, final norm, LM head, argmax
    for steps, per_layer, fixed in ((prefill, 1, 8), (mixed, 2, 8)):
        got = steps.summary()
        print(got)
        assert got["replays"] == layers + 1 and got["graph_nodes"] <= 10 * layers + 6, got
        assert got["launches"] <= per_layer * layers + fixed, got
        assert got["h2d"] == 1 and got["d2h"] == 1 and got["syncs"] == 0, (got, steps.syncs)


@host
def test_a_step_ahead_launches_before_it_reads_the_last_steps_ids(folder):
    """One step ahead: step N+1 is copied, launched and its ids' copy queued before the host reads step
    N's ids; the ids step N+1 feeds the model are read from step N's on the device."""
    with ops.cuda_kernels_on_cpu():
        engine = new_engine(folder, async_scheduling=True)
        decoding(engine, GREEDY, 3)
        assert engine._in_flight is not None
        with count_steps() as steps:
            engine.step()
    events = [e if isinstance(e, str) else e[0] for e in steps.events]
    assert events.count("h2d") == 1 and events.count("d2h") == 1 and events.count("read") == 1
    assert max(i for i, e in enumerate(events) if e == "launch") < events.index("read")
    assert events.index("d2h") < events.index("read")
    assert steps.summary()["syncs"] == 0, steps.syncs
    ops_run = [e[1] for e in steps.events if isinstance(e, tuple) and e[0] == "op"]
    assert "where" in ops_run  # ids in flight taken from the previous step's sampled ids


@host
def test_moe_steps_sync_once_per_sparse_layer(moe_folder):
    """An MoE step reads its rows per expert back to size the expert GEMMs: one host sync per sparse
    layer, none elsewhere; the rest runs from piecewise graphs, the sparse MLPs between the pieces."""
    with ops.cuda_kernels_on_cpu():
        engine = new_engine(moe_folder)
        decoding(engine, GREEDY, 3)
        with count_steps() as steps:
            engine.step()
    layers = engine.runner.model.layers
    sparse = sum(w.moe is not None for w in layers)
    got = steps.summary()
    # a piece before each attention, one after the last layer, and one more after each sparse MLP but the last
    assert got["replays"] == len(layers) + 1 + sum(w.moe is not None for w in layers[:-1]), got
    assert got["h2d"] == 1 and got["d2h"] == 1, got
    assert 0 < got["syncs"] <= sparse, steps.syncs


def outputs(folder, **kw) -> tuple[list, collections.Counter]:
    """Token ids of a mix of requests arriving over the steps, and the kinds of step that ran."""
    engine = new_engine(folder, **kw)
    kinds = collections.Counter()
    run, graph_mode = engine.runner.run, engine.runner.graph_mode

    def counted_run(decodes, chunks):
        kinds["mixed" if decodes and chunks else "prefill" if chunks else "decode, not whole-step"] += 1
        return run(decodes, chunks)

    def counted_mode(decodes, rows):
        mode = graph_mode(decodes, rows)
        if mode is not None:
            kinds[mode[0]] += 1
        return mode
    engine.runner.run, engine.runner.graph_mode = counted_run, counted_mode
    plan = [(0, [5, 6, 7], GREEDY), (0, [9, 10, 11, 12, 13], SEEDED), (2, list(range(20, 60)), GREEDY),
            (3, [7, 7, 7], LOGPROBS), (5, [1, 2], SamplingParams(temperature=0.7, seed=3, n=2, max_tokens=30)),
            (6, [4, 4, 4, 4], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[17])),
            (8, list(range(30, 50)), GREEDY), (9, [2, 3], SamplingParams(temperature=0, max_tokens=25,
                                                                         repetition_penalty=1.3)),
            (10, [8, 9], REGEX), (50, [3, 1], REGEX)]
    results, step = {}, 0
    while plan or engine.has_unfinished():
        while plan and plan[0][0] <= step:
            _, prompt, params = plan.pop(0)
            engine.add_request(f"r{len(results)}", prompt, params)
            results[f"r{len(results)}"] = {}
        for delta in engine.step():
            results[delta.request_id].setdefault(delta.index, []).extend(delta.token_ids)
        step += 1
    return [[r[i] for i in sorted(r)] for r in results.values()], kinds


@host
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_every_kind_of_step_gives_the_cpu_paths_tokens(folder, moe_folder, moe):
    """The CPU path, the CUDA path (host build) step by step, and the CUDA path one step ahead: the same
    tokens for greedy, seeded, n=2, logprobs, a stop token, a repetition penalty and a regex, over every
    step kind."""
    path = moe_folder if moe else folder
    expected, _ = outputs(path)
    assert outputs(path, async_scheduling=True)[0] == expected  # the CPU path one step ahead too
    with ops.cuda_kernels_on_cpu():
        stepped, kinds = outputs(path)
        ahead, kinds_ahead = outputs(path, async_scheduling=True)
    assert stepped == expected
    assert ahead == expected
    wanted = {"prefill", "mixed", "decode, not whole-step"} | (
        set() if moe else {"greedy", "sample", "forward", "greedy-masked"})
    assert wanted <= set(kinds) and wanted <= set(kinds_ahead), (kinds, kinds_ahead)


@gpu
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_every_kind_of_step_on_gpu_gives_the_cpu_paths_tokens(folder, moe_folder, moe, monkeypatch):
    """With --device cuda: graphs captured (whole decode steps, pieces), steps one step ahead and not."""
    path = moe_folder if moe else folder
    expected, _ = outputs(path)
    engines_on_cuda(monkeypatch)
    for ahead in (False, True):
        got, kinds = outputs(path, async_scheduling=ahead)
        assert got == expected, (ahead, kinds)


def test_aborts_and_preemption_with_tokens_in_flight_free_every_block(folder):
    """One step ahead on the CPU path: requests aborted while their token is in flight, and preemption
    (a KV cache too small for everyone), leave no block held and no request behind."""
    engine = LLMEngine(EngineConfig(model=folder, dtype="float32", block_size=16, num_kv_blocks=9,
                                    async_scheduling=True))
    for i in range(6):
        engine.add_request(f"r{i}", list(range(1, 30 + i)), GREEDY)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 4:
            assert any(s.num_in_flight for s in engine.scheduler.running)
            engine.abort_request("r1")
            engine.abort_request("r4")
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_async_scheduling_is_refused_with_speculative_decoding():
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(async_scheduling=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def run_to_end(engine: LLMEngine, max_steps: int = 200) -> dict:
    tokens: dict = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return tokens
        for delta in engine.step():
            tokens.setdefault((delta.request_id, delta.index), []).extend(delta.token_ids)
    raise AssertionError(f"still running after {max_steps} steps")


@host
@pytest.mark.parametrize("prompt", [[5], list(range(1, 18))], ids=["one token", "one token past the cache"])
def test_n_samples_fork_when_the_prompts_last_token_is_a_graphed_decode(folder, prompt):
    """A prompt with one token left to compute (one token long, or all but one token from the prefix cache)
    is a decode step: its n samples still fork, and the request finishes."""
    params = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=5, ignore_eos=True)
    with ops.cuda_kernels_on_cpu():
        engine = new_engine(folder)
        engine.add_request("warm", prompt, GREEDY)
        run_to_end(engine)
        engine.add_request("forked", prompt, params)
        got = run_to_end(engine)
    assert sorted(k for k in got if k[0] == "forked") == [("forked", 0), ("forked", 1)]
    assert all(len(v) == 5 for k, v in got.items() if k[0] == "forked") and not engine.requests


def test_a_step_ahead_sampled_row_by_row_after_a_fault_appends_tokens_in_order(folder):
    """One step ahead, a sampling fault makes step N+1 sample row by row (its ids on the host at once):
    step N's ids are appended first, so every token lands where an untroubled run puts it."""
    def run(poison_call: int | None) -> dict:
        engine = LLMEngine(EngineConfig(model=folder, dtype="float32", block_size=16, num_kv_blocks=32,
                                        async_scheduling=True))
        launch, calls = engine.sampler.launch, [0]

        def flaky_launch(logits, seqs):
            calls[0] += 1
            if calls[0] == poison_call:
                raise RuntimeError("injected sampling fault")
            return launch(logits, seqs)
        engine.sampler.launch = flaky_launch
        for i in range(2):
            engine.add_request(f"r{i}", [3 + i, 4, 5], SamplingParams(temperature=0, max_tokens=8))
        return run_to_end(engine)
    assert run(poison_call=5) == run(poison_call=None)
