"""Every tensor of a checkpoint must reach the model, in the right place and orientation.

The test checkpoints carry random norm weights and biases (tests/checkpoints.py), so a loader that
skipped, transposed or misplaced any tensor would change the logits. Each test runs one prefill
through the loaded model and compares all positions with transformers in float32.
"""
import glob
import os
import random

import pytest
import torch

from scalellm.model.loader import load_model
from scalellm.model.weights import build_model
from tests.checkpoints import hf_prompt_logits, prompt_logits

_rng = random.Random(5)
PROMPT = [_rng.randrange(3, 49152) for _ in range(21)]
TOL = dict(atol=2e-4, rtol=1e-4)


def read_checkpoint(folder: str) -> dict[str, torch.Tensor]:
    """The tensors as written, read with safetensors itself rather than through the loader under test."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def altered(t: torch.Tensor) -> torch.Tensor:
    """The transpose of a square matrix, otherwise the same values shifted by one row (or element)."""
    if t.dim() == 2 and t.shape[0] == t.shape[1]:
        return t.t().contiguous()
    return torch.roll(t, 1, dims=0)


@pytest.fixture(scope="module")
def models(checkpoint):
    from transformers import AutoModelForCausalLM

    arch, folder = checkpoint
    loaded = load_model(folder, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, loaded, hf


def test_prompt_logits_match_transformers(models):
    folder, loaded, hf = models
    ours = prompt_logits(loaded.model, PROMPT)
    ref = hf_prompt_logits(hf, PROMPT)
    torch.testing.assert_close(ours, ref, **TOL)


def test_every_tensor_matters_and_lands_where_transformers_uses_it(models):
    folder, loaded, hf = models
    tensors = read_checkpoint(folder)
    assert len(tensors) >= 20
    base = prompt_logits(loaded.model, PROMPT)
    for name, original in tensors.items():
        changed = altered(original)
        stream = ((n, changed if n == name else t) for n, t in tensors.items())
        model = build_model(loaded.config, stream, torch.float32, loaded.config.max_position_embeddings)
        ours = prompt_logits(model, PROMPT)
        param = hf.get_parameter(name)
        saved = param.detach().clone()
        with torch.no_grad():
            param.copy_(changed)
        try:
            ref = hf_prompt_logits(hf, PROMPT)
        finally:
            with torch.no_grad():
                param.copy_(saved)
        assert (ours - base).abs().max() > 1e-2, f"altering {name} does not change the logits"
        torch.testing.assert_close(ours, ref, **TOL, msg=lambda m: f"{name} altered: {m}")
