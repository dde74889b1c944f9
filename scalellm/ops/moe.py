"""The mixture-of-experts layer, fused: route every token at once, group the (token, expert) pairs by
expert with one sort, run one gate-up GEMM and one down GEMM per active expert over all of its tokens,
and add each result back to its token weighted by its routing weight. No Python loop over tokens; the
loop over experts runs once per active expert.

Routing follows transformers: softmax over the router logits in float32, top-k, optionally renormalized
over the chosen experts, the weights cast back to the activations' dtype. On the CUDA kernels, routing,
permutation, gather and the weighted combine are kernels (cuda_kernels/moe_routing.cu); the rows per
expert come back to the host once per layer, to size the GEMMs (a wait on the device, so models with
experts run without CUDA graphs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scalellm.ops.linear import Linear


@dataclass
class MoEWeights:
    router: Linear  # [experts, hidden]
    gate_up: list[Linear]  # per expert: [2 * moe_intermediate, hidden], gate then up
    down: list[Linear]  # per expert: [hidden, moe_intermediate]
    top_k: int
    renormalize: bool
    weights_float32: bool = False  # Mixtral: weight the experts' outputs in float32 (Qwen: in x's dtype)
    shared_gate_up: Linear | None = None  # Qwen2-MoE's shared expert
    shared_down: Linear | None = None
    shared_gate: Linear | None = None  # [1, hidden]: sigmoid gate on the shared expert's output

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)

    @property
    def linears(self) -> list[Linear]:
        return [lin for lin in (self.router, *self.gate_up, *self.down, self.shared_gate_up, self.shared_down,
                                self.shared_gate) if lin is not None]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype):
    """-> (weights [tokens, k] in dtype, expert ids [tokens, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def group_by_expert(experts: torch.Tensor, num_experts: int):
    """(token, slot) pairs sorted by expert: (token of each sorted pair, its flat pair index, pairs per expert)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order // experts.shape[1], order, counts


def _experts(w: MoEWeights, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows grouped by expert -> each expert's MLP over its rows: one gate-up and one down GEMM per expert."""
    out_rows = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = slice(start, start + n)
            gate, up = w.gate_up[e](rows[seg]).chunk(2, dim=-1)
            out_rows[seg] = w.down[e](F.silu(gate) * up)
            start += n
    return out_rows


def _shared_and_residual(x: torch.Tensor, out: torch.Tensor, w: MoEWeights, residual: torch.Tensor | None):
    if w.shared_gate_up is not None:
        gate, up = w.shared_gate_up(x).chunk(2, dim=-1)
        out += torch.sigmoid(w.shared_gate(x)) * w.shared_down(F.silu(gate) * up)
    return out if residual is None else residual + out


def fused_moe_cuda_kernels(x: torch.Tensor, w: MoEWeights, residual: torch.Tensor | None = None) -> torch.Tensor:
    from scalellm.ops.cuda import backend as cb

    weights, ids, counts = cb.moe_route(w.router(x), w.top_k, w.renormalize)
    offsets, slot_of_pair, token_of_slot = cb.moe_permute(ids, counts)
    rows = cb.moe_gather(x, token_of_slot)
    out_rows = _experts(w, rows, counts.tolist())
    combined = cb.moe_combine(out_rows, slot_of_pair, ids, weights, not w.weights_float32)
    return _shared_and_residual(x, combined, w, residual)


def fused_moe(x: torch.Tensor, w: MoEWeights, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [tokens, hidden] -> the layer's output (+ residual when given)."""
    weights, experts = route(w.router(x), w.top_k, w.renormalize, torch.float32 if w.weights_float32 else x.dtype)
    tokens, pairs, counts = group_by_expert(experts, w.num_experts)
    out_rows = _experts(w, x[tokens], counts.tolist())
    if w.weights_float32:
        out_rows = (out_rows.float() * weights.reshape(-1)[pairs, None]).to(x.dtype)
    else:
        out_rows *= weights.reshape(-1)[pairs, None]
    out = torch.zeros_like(x).index_add_(0, tokens, out_rows)  # per token, in expert order (as transformers)
    return _shared_and_residual(x, out, w, residual)
