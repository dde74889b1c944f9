"""What a request must satisfy before the engine takes it: a prompt inside the vocabulary that leaves
room in the context and in the KV cache for max_tokens more."""
from __future__ import annotations

from scalellm.engine.block_manager import BlockManager
from scalellm.engine.continuation import validate_continuation
from scalellm.sampling_params import SamplingParams


def validate_prompt(prompt_token_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int,
                    block_manager: BlockManager) -> None:
    """Raises ValueError saying what is wrong."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt must not be empty")
    if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
        raise ValueError(f"prompt contains token ids outside the vocabulary [0, {vocab})")
    if n >= max_model_len:
        raise ValueError(f"prompt has {n} tokens, which leaves no room in the model's context "
                         f"length of {max_model_len}")
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ValueError(f"max_tokens={params.max_tokens} plus the prompt's {n} tokens exceeds the "
                         f"model's context length of {max_model_len}")
    if params.continuation is not None:
        validate_continuation(params, n, vocab, max_model_len)
    for name in ("logit_bias", "allowed_token_ids"):
        ids = getattr(params, name) or ()
        if any(t >= vocab for t in ids):
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab})")
    total = n + (max_model_len - n if params.max_tokens is None else params.max_tokens)
    if block_manager.blocks_needed(total) > block_manager.num_blocks:
        raise ValueError(f"prompt plus max_tokens ({total} tokens) exceeds the KV cache capacity of "
                         f"{block_manager.num_blocks * block_manager.block_size} tokens")
