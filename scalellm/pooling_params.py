"""Per-request parameters of an embedding: how the prompt's hidden states become one vector."""
from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass
class PoolingParams:
    pooling_type: str | None = None  # LAST, MEAN or CLS; None: the model's (engine/pooling.py)
    normalize: bool | None = None  # L2-normalize the vector; None: as the model is configured
    dimensions: int | None = None  # keep the first this many (models that declare Matryoshka sizes only)

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
                raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
            self.pooling_type = self.pooling_type.upper()
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
