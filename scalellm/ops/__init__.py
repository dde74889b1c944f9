"""The operations model code calls; one interface whatever the backend."""
from scalellm.ops.attention_metadata import AttentionMetadata, PrefillChunk, build_attention_metadata
from scalellm.ops.torch_ops import add_rms_norm, paged_attention, rms_norm, rotary, silu_mul, write_kv

__all__ = [
    "AttentionMetadata", "PrefillChunk", "build_attention_metadata",
    "add_rms_norm", "paged_attention", "rms_norm", "rotary", "silu_mul", "write_kv",
]
