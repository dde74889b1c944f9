"""Mistral's sliding window: prompts and outputs longer than the window, token-identical to
transformers, which masks keys more than `sliding_window - 1` positions back."""
import random

import pytest

from scalellm import LLM, SamplingParams
from scalellm.model.loader import load_model
from tests.checkpoints import build_checkpoint, hf_greedy, model_greedy

WINDOW = 16
MAX_NEW = 20


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    folder = build_checkpoint("mistral", str(tmp_path_factory.mktemp("ckpt-mistral-window")), seed=4,
                              sliding_window=WINDOW)
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (40, 70, 9)]
    expected, _ = hf_greedy(folder, prompts, MAX_NEW)
    unwindowed, _ = hf_greedy(folder, prompts, MAX_NEW, sliding_window=None)
    assert expected[:2] != unwindowed[:2]  # beyond the window the mask changes the output
    return folder, prompts, expected


def test_model_and_attention_ops_follow_the_window(windowed):
    """Chunked prefill across the window's edge, then decode steps whose context starts past 0."""
    folder, prompts, expected = windowed
    loaded = load_model(folder, dtype="float32")
    assert loaded.config.sliding_window == WINDOW
    assert [model_greedy(loaded.model, p, MAX_NEW, chunk=24) for p in prompts] == expected


def test_engine_serves_contexts_longer_than_the_window(windowed):
    folder, prompts, expected = windowed
    llm = LLM(folder, dtype="float32", max_num_batched_tokens=24)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in out] == expected
