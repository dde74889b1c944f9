"""A weight held in one of GGUF's 32-element block formats (Q8_0, Q4_0, Q4_1), as in the file.

Q8_0: w = d * q (q signed 8-bit); Q4_0: w = d * (q - 8); Q4_1: w = d * q + m (q 4-bit, d and m
float16, one per block). The blocks are split into arrays by field (quantized bytes, scales, minimums)
so that kernels load each field as a vector; the bytes and their order within a block are the file's,
so the memory is the file's too. Rows can be concatenated, reordered and sliced like a tensor's
(blocks run along the input dimension), which is all the model's weight fusion needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scalellm.ops.quant.ir import GROUP_ROWS, GROUPED_FORMATS, QUANT_BYTES

BLOCK = 32
GGUF_TYPES = {8: "q8_0", 2: "q4_0", 3: "q4_1"}  # GGML type id -> format
GGUF_TYPE_IDS = {name: tid for tid, name in GGUF_TYPES.items()}
_HEADER_BYTES = {"q8_0": 2, "q4_0": 2, "q4_1": 4}  # d (and m) before the quantized bytes in a file block


@dataclass
class QuantizedTensor:
    format: str  # q8_0, q4_0 or q4_1
    qs: torch.Tensor  # uint8 [rows, blocks * QUANT_BYTES[format]]
    d: torch.Tensor  # float16 [rows, blocks]
    m: torch.Tensor | None  # float16 [rows, blocks], Q4_1 only
    # 16: Q8_0 or Q4_0 rows in groups of 16, as the CPU kernels read them (grouped()); qs [rows / 16,
    # blocks * 16 * QUANT_BYTES], d [rows / 16, blocks * 16]. The bytes are the file's, reordered (Q8_0's
    # plus 128); methods other than the shape and the byte count work on the file's order (ungrouped()).
    group: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0] * self.group, self.d.shape[1] // self.group * BLOCK

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def dim(self) -> int:
        return 2

    @classmethod
    def from_gguf_blocks(cls, fmt: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
        """raw: the file's bytes for a [rows, cols] tensor (cols a multiple of 32)."""
        rows, cols = shape
        header, quant = _HEADER_BYTES[fmt], QUANT_BYTES[fmt]
        blocks = np.asarray(raw).reshape(-1).view(np.uint8).reshape(rows, cols // BLOCK, header + quant)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if fmt == "q4_1" else None
        qs = torch.from_numpy(np.ascontiguousarray(blocks[..., header:]).reshape(rows, -1))
        return cls(fmt, qs, d, m)

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str) -> QuantizedTensor:
        """A float [rows, cols] weight quantized as llama.cpp's reference quantizer does (the gguf package's)."""
        import gguf

        rows, cols = weight.shape
        if cols % BLOCK:
            raise ValueError(f"cannot quantize a weight with {cols} columns to {fmt}: not a multiple of {BLOCK}")
        values = weight.detach().to(torch.float32).cpu().numpy()
        raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType(GGUF_TYPE_IDS[fmt]))
        return cls.from_gguf_blocks(fmt, raw, (rows, cols))

    def grouped(self) -> QuantizedTensor:
        """Q8_0 or Q4_0 with each 16 rows' blocks interleaved for quant_ir.make_grouped_dot: per block,
        QUANT_BYTES / 4 64-byte vectors whose 32-bit lane r holds bytes 4i..4i+3 of row r (Q8_0's plus 128,
        as unsigned bytes), then the rows' scales together."""
        rows = GROUP_ROWS
        if self.format not in GROUPED_FORMATS or self.group != 1 or self.shape[0] % rows:
            raise ValueError(f"only Q8_0 and Q4_0 with a multiple of {rows} rows group, not {self.format} "
                             f"{self.shape}")
        n, nb = self.d.shape
        words = QUANT_BYTES[self.format] // 4
        qs = self.qs ^ 128 if self.format == "q8_0" else self.qs
        qs = qs.reshape(n // rows, rows, nb, words, 4).permute(0, 2, 3, 1, 4).reshape(n // rows, nb * words * 64)
        d = self.d.reshape(n // rows, rows, nb).permute(0, 2, 1).reshape(n // rows, nb * rows)
        return QuantizedTensor(self.format, qs.contiguous(), d.contiguous(), None, rows)

    def ungrouped(self) -> QuantizedTensor:
        if self.group == 1:
            return self
        g, rows = self.qs.shape[0], self.group
        nb = self.d.shape[1] // rows
        words = QUANT_BYTES[self.format] // 4
        qs = self.qs.reshape(g, nb, words, rows, 4).permute(0, 3, 1, 2, 4).reshape(g * rows, nb * words * 4)
        if self.format == "q8_0":
            qs = qs ^ 128
        d = self.d.reshape(g, nb, rows).permute(0, 2, 1).reshape(g * rows, nb)
        return QuantizedTensor(self.format, qs.contiguous(), d.contiguous(), None)

    def to_gguf_blocks(self) -> np.ndarray:
        """The file's bytes [rows, blocks * bytes per block] (the inverse of from_gguf_blocks)."""
        if self.group != 1:
            return self.ungrouped().to_gguf_blocks()
        rows, nb = self.d.shape
        parts = [self.d.cpu().numpy().view(np.uint8).reshape(rows, nb, 2)]
        if self.m is not None:
            parts.append(self.m.cpu().numpy().view(np.uint8).reshape(rows, nb, 2))
        parts.append(self.qs.cpu().numpy().reshape(rows, nb, -1))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.group != 1:
            return self.ungrouped().dequantize(dtype)
        rows, nb = self.d.shape
        q = self.qs.reshape(rows, nb, -1)
        if self.format == "q8_0":
            values = q.view(torch.int8).float()
        else:
            values = torch.cat([q & 15, q >> 4], dim=-1).float()
        d = self.d.float()[..., None]
        if self.format == "q4_0":
            w = (values - 8) * d
        elif self.format == "q4_1":
            w = values * d + self.m.float()[..., None]
        else:
            w = values * d
        return w.reshape(rows, nb * BLOCK).to(dtype)

    def _map(self, fn) -> QuantizedTensor:
        if self.group != 1:
            return self.ungrouped()._map(fn)
        return QuantizedTensor(self.format, fn(self.qs), fn(self.d), None if self.m is None else fn(self.m))

    def rows(self, index) -> QuantizedTensor:
        """A row slice or a reordering (an index tensor) of the weight."""
        return self._map(lambda t: t[index].contiguous())

    def reshape_rows(self, fn) -> QuantizedTensor:
        """Apply a reordering of rows given as a function of a [rows, ...] tensor (e.g. llama.cpp's q/k
        permutation)."""
        return self._map(lambda t: fn(t).contiguous())

    def to(self, device) -> QuantizedTensor:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        parts = [p.ungrouped() for p in parts]
        fmt = parts[0].format
        if any(p.format != fmt for p in parts) or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("only weights of one format and width concatenate")
        return QuantizedTensor(fmt, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]),
                               None if parts[0].m is None else torch.cat([p.m for p in parts]))
