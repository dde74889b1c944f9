"""Mixture-of-experts weights: every checkpoint layout to one set of names, and the fused layer's weights.

The canonical names are Qwen-MoE's per-expert ones (model.layers.N.mlp.gate.weight for the router,
mlp.experts.E.{gate,up,down}_proj.weight, mlp.shared_expert.*, mlp.shared_expert_gate.weight).
Mixtral's files (block_sparse_moe.experts.E.w1/w3/w2), transformers' stacked in-memory layout
(mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]) and llama.cpp's stacked GGUF
tensors are mapped onto them.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from scalellm.model.config import ModelConfig
from scalellm.ops.linear import Linear
from scalellm.ops.moe import MoEWeights

_MIXTRAL = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$")
_STACKED = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> canonical (name, tensor) pairs (several for a stacked expert tensor)."""
    m = _MIXTRAL.match(name)
    if m:
        prefix, rest, expert, proj = m.groups()
        if expert is None:
            yield prefix + "mlp.gate.weight", tensor
        else:
            yield f"{prefix}mlp.experts.{expert}.{_MIXTRAL_PROJ[proj]}.weight", tensor
        return
    m = _STACKED.match(name)
    if m:
        prefix, kind = m.groups()
        if kind == "down_proj":
            yield from stacked(prefix, "down_proj", tensor)
        else:
            gate, up = tensor.chunk(2, dim=1)
            yield from stacked(prefix, "gate_proj", gate)
            yield from stacked(prefix, "up_proj", up)
        return
    if name.endswith("mlp.shared_expert_gate.weight") and tensor.dim() == 1:
        tensor = tensor[None]
    yield name, tensor


def stacked(prefix: str, proj: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """[experts, out, in] -> one tensor per expert."""
    for e in range(tensor.shape[0]):
        yield f"{prefix}mlp.experts.{e}.{proj}.weight", tensor[e]


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The MoE block's tensors of one sparse layer, names relative to the layer."""
    h, i = c.hidden_size, c.moe_intermediate_size
    shapes = {"mlp.gate.weight": (c.num_experts, h)}
    for e in range(c.num_experts):
        shapes.update({f"mlp.experts.{e}.gate_proj.weight": (i, h), f"mlp.experts.{e}.up_proj.weight": (i, h),
                       f"mlp.experts.{e}.down_proj.weight": (h, i)})
    if c.shared_expert_intermediate_size:
        s = c.shared_expert_intermediate_size
        shapes.update({"mlp.shared_expert.gate_proj.weight": (s, h), "mlp.shared_expert.up_proj.weight": (s, h),
                       "mlp.shared_expert.down_proj.weight": (h, s), "mlp.shared_expert_gate.weight": (1, h)})
    return shapes


def build_moe(c: ModelConfig, get: Callable[[str], torch.Tensor], prefix: str,
              linear: Callable[..., Linear]) -> MoEWeights:
    def experts(proj: str) -> list[torch.Tensor]:
        return [get(f"{prefix}mlp.experts.{e}.{proj}.weight") for e in range(c.num_experts)]

    gate_up = [linear(torch.cat([g, u])) for g, u in zip(experts("gate_proj"), experts("up_proj"))]
    moe = MoEWeights(router=linear(get(prefix + "mlp.gate.weight")), gate_up=gate_up,
                     down=[linear(d) for d in experts("down_proj")], top_k=c.num_experts_per_tok,
                     renormalize=c.norm_topk_prob, weights_float32=c.moe_weights_float32)
    if c.shared_expert_intermediate_size:
        shared = prefix + "mlp.shared_expert."
        moe.shared_gate_up = linear(torch.cat([get(shared + "gate_proj.weight"), get(shared + "up_proj.weight")]))
        moe.shared_down = linear(get(shared + "down_proj.weight"))
        moe.shared_gate = linear(get(prefix + "mlp.shared_expert_gate.weight"))
    return moe
