"""Multi-LoRA serving: the adapters a server knows, the slots that hold up to max_loras of them for the
model's steps, and each step's token-to-adapter map.

Adapters are registered by name (--lora-modules, /v1/load_lora_adapter, or LLM.generate's lora_request)
and read and checked at once (model/lora.py); up to max_cpu_loras stay read in memory, the least
recently used beyond that are read again when next needed. A step's adapters (the scheduler admits at
most max_loras different ones among the running sequences) are copied into slots, evicting adapters the
step does not use. Unloading an adapter refuses new requests for it at once; its running requests
finish first, and then it goes.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from scalellm import ops
from scalellm.lora_request import LoRARequest
from scalellm.model.config import ModelConfig
from scalellm.model.lora import GROUPS, LoRAAdapter, group_inputs, group_parts, load_adapter

LORA_KERNELS = ("batched", "grouped")


def new_lora_manager(config, loaded) -> LoRAManager | None:
    """The engine's manager (config: EngineConfig), its --lora-modules registered; None with LoRA off."""
    if not config.enable_lora:
        return None
    model = loaded.model
    manager = LoRAManager(loaded.config, model.dtype, model.embed.device, config.max_loras, config.max_lora_rank,
                          config.max_cpu_loras, config.lora_kernel)
    for module in config.lora_modules or []:
        manager.add(module if isinstance(module, LoRARequest) else
                    LoRARequest(module["name"], len(manager.requests) + 1, module["path"]))
    return manager


class LoRASlots:
    """Slot-stacked adapter weights per (layer, fused projection): A [slots, R, in], B^T [slots, R, out]."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, slots: int, max_rank: int):
        parts, inputs = group_parts(config), group_inputs(config)
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(config.num_layers):
            for g in GROUPS:
                if config.is_sparse(layer) and g in ("gate_up", "down"):
                    continue
                rank = len(parts[g]) * max_rank
                out = parts[g][-1][1] + parts[g][-1][2]
                self.a[layer, g] = torch.zeros(slots, rank, inputs[g], dtype=dtype, device=device)
                self.b[layer, g] = torch.zeros(slots, rank, out, dtype=dtype, device=device)
                if torch.device(device).type == "cpu":  # numba views made once, for the CPU kernel
                    ops.keep_numba_view(self.a[layer, g])
                    ops.keep_numba_view(self.b[layer, g])

    def fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for key, a in self.a.items():
            weights = adapter.weights.get(key)
            if weights is None:
                a[slot].zero_()
                self.b[key][slot].zero_()
            else:
                a[slot].copy_(weights[0])
                self.b[key][slot].copy_(weights[1].t())


class LoRABatch:
    """One step's adapters: each token's slot (-1: the base model), and the projection's added term."""

    def __init__(self, slots: LoRASlots, token_slots: np.ndarray, kernel: str):
        self.slots = slots
        self.kernel = kernel
        used = np.unique(token_slots[token_slots >= 0])
        self.single = int(used[0]) if len(used) == 1 and (token_slots >= 0).all() else None
        self.masks: dict[int, torch.Tensor] = {}  # masked: per rank width R, [tokens, slots * R]
        self.token_slots = token_slots
        self.order, self.runs = None, []  # grouped: tokens sorted by slot, and the runs of each slot
        if kernel == "grouped":
            order = np.argsort(token_slots, kind="stable")
            ordered = token_slots[order]
            change = np.flatnonzero(np.diff(ordered)) + 1
            starts, ends = np.concatenate([[0], change]), np.concatenate([change, [len(ordered)]])
            self.runs = [(int(ordered[s]), int(s), int(e)) for s, e in zip(starts, ends) if ordered[s] >= 0]
            if not (order == np.arange(len(order))).all():
                self.order = torch.from_numpy(order).to(next(iter(slots.a.values())).device)

    def add(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the projection's output for x) plus each token's adapter term, in place."""
        a = self.slots.a.get((layer, group))
        if a is None:
            return y
        b = self.slots.b[layer, group]
        if self.kernel == "grouped":
            return ops.add_lora_grouped(y, x, a, b, self.order, self.runs)
        if not ops.uses_cuda_kernels(y):  # the CPU: one numba call (ops/cpu/lora.py)
            return ops.add_lora_bgmv(y, x, a, b, self.token_slots)
        if self.single is not None:
            return ops.add_lora(y, x, a[self.single], b[self.single])
        slots, rank = a.shape[0], a.shape[1]
        mask = self.masks.get(rank)
        if mask is None:
            column_slot = torch.arange(slots).repeat_interleave(rank)
            mask = torch.from_numpy(self.token_slots)[:, None] == column_slot[None, :]
            mask = self.masks[rank] = mask.to(device=y.device, dtype=y.dtype)
        return ops.add_lora(y, x, a.view(slots * rank, -1), b.view(slots * rank, -1), mask)


class LoRAManager:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_loras: int, max_rank: int,
                 max_cpu_loras: int | None, kernel: str = "batched"):
        if kernel not in LORA_KERNELS:
            raise ValueError(f"lora kernel must be one of {LORA_KERNELS}, got {kernel!r}")
        self.config, self.dtype = config, dtype
        self.max_loras, self.max_rank = max_loras, max_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.kernel = kernel
        self.requests: dict[str, LoRARequest] = {}
        self.unloading: set[str] = set()
        self.cached: OrderedDict[str, LoRAAdapter] = OrderedDict()  # read adapters, least recently used first
        self.slots = LoRASlots(config, dtype, device, max_loras, max_rank)
        self.slot_names: list[str | None] = [None] * max_loras
        self.slot_of: dict[str, int] = {}
        self.salt_of: dict[str, tuple[str, int]] = {}  # prefix-cache salt: (name, which load of that name)
        self.num_loads = 0

    # -- registry ------------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> None:
        """Register an adapter: read and checked now (ValueError if it cannot be served)."""
        name = request.lora_name
        if not isinstance(name, str) or not name:
            raise ValueError("lora_name must be a non-empty string")
        if name in self.unloading:
            raise ValueError(f"the LoRA adapter {name!r} is still unloading (its running requests finish first); "
                             f"load it again once it is gone from /v1/models")
        known = self.requests.get(name)
        if known is not None:
            if known.lora_path == request.lora_path:
                return
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded (from {known.lora_path})")
        self._read(request)
        self.requests[name] = request
        self.num_loads += 1
        self.salt_of[name] = (name, self.num_loads)
        self._touch(name)

    def remove(self, name: str) -> None:
        """New requests for it are refused from now on; it goes once none of its requests runs (drop())."""
        if name not in self.requests or name in self.unloading:
            raise KeyError(name)
        self.unloading.add(name)

    def drop(self, name: str) -> None:
        """Forget an unloading adapter whose requests have all finished."""
        self.unloading.discard(name)
        self.requests.pop(name, None)
        self.salt_of.pop(name, None)
        self.cached.pop(name, None)
        self._evict_slot(name)

    def serves(self, name: str) -> bool:
        return name in self.requests and name not in self.unloading

    def check(self, name: str) -> tuple[str, int]:
        """A request's adapter: its prefix-cache salt, or ValueError if it is not served."""
        if not self.serves(name):
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"LoRA adapter {name!r} is not loaded (loaded: {known})")
        return self.salt_of[name]

    def info(self, scheduler) -> dict:
        """What vLLM's lora_requests_info reports: the adapters of running and of waiting sequences."""
        def names(seqs) -> list[str]:  # seqs: a copy (list() of them is one C call: the engine thread may change them)
            return sorted({s.params.lora_name for s in seqs} - {None})
        return {"max_lora": self.max_loras, "running": names(list(scheduler.running)),
                "waiting": names(list(scheduler.waiting))}

    def drop_unused(self, running: set[str | None]) -> None:
        """Forget the unloading adapters no request runs with any more."""
        for name in [n for n in self.unloading if n not in running]:
            self.drop(name)

    def names(self) -> list[str]:
        """(Any thread: the registry is copied in one C call before it is read.)"""
        unloading = set(self.unloading)
        return [n for n in list(self.requests) if n not in unloading]

    # -- steps ---------------------------------------------------------------------------------
    def batch(self, names: list[str | None], counts: list[int]) -> LoRABatch | None:
        """The step's map: sequence i (adapter names[i], counts[i] tokens in this step) -> slots, every
        adapter the step uses put in a slot first. None when every token is the base model's."""
        if not any(names):
            return None
        for name in {n for n in names if n}:
            self._slot(name, names)
        slot = [self.slot_of[n] if n else -1 for n in names]
        return LoRABatch(self.slots, np.repeat(np.asarray(slot, np.int64), counts), self.kernel)

    def _slot(self, name: str, step: list[str | None]) -> int:
        slot = self.slot_of.get(name)
        if slot is not None:
            return slot
        free = [i for i, n in enumerate(self.slot_names) if n is None or n not in step]
        if not free:
            raise RuntimeError(f"a step uses more than max_loras={self.max_loras} LoRA adapters")
        slot = free[0]
        old = self.slot_names[slot]
        if old is not None:
            del self.slot_of[old]
        self.slots.fill(slot, self._adapter(name))
        self.slot_names[slot], self.slot_of[name] = name, slot
        return slot

    def _adapter(self, name: str) -> LoRAAdapter:
        adapter = self.cached.get(name)
        if adapter is None:
            adapter = self._read(self.requests[name])
        self._touch(name)
        return adapter

    def _read(self, request: LoRARequest) -> LoRAAdapter:
        adapter = load_adapter(request.lora_name, request.lora_path, self.config, self.dtype, self.max_rank)
        self.cached[request.lora_name] = adapter
        return adapter

    def _touch(self, name: str) -> None:
        self.cached.move_to_end(name)
        while len(self.cached) > self.max_cpu_loras:
            self.cached.popitem(last=False)

    def _evict_slot(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.slot_names[slot] = None
