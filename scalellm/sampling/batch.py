"""Moved: the sampling arrays live in scalellm/ops/sampling_batch.py, their builder in scalellm/engine/sampler.py."""
from scalellm.engine.sampler import build_sampling_batch  # noqa: F401
from scalellm.ops.sampling_batch import SamplingBatch, stream_key  # noqa: F401
