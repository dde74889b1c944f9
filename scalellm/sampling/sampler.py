"""Moved: the sampler lives in scalellm/engine/sampler.py."""
from scalellm.engine.sampler import SampleResult, Sampler  # noqa: F401
