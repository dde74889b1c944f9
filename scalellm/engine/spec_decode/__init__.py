"""Speculative decoding: drafts proposed (n-gram prompt lookup or a draft model), verified by the
target in one forward pass per step, accepted exactly, and throttled when they would cost."""
from scalellm.engine.spec_decode.config import SpeculativeConfig
from scalellm.engine.spec_decode.rows import DraftRow, sampler_rows
from scalellm.engine.spec_decode.speculator import Speculator

__all__ = ["DraftRow", "SpeculativeConfig", "Speculator", "sampler_rows"]
