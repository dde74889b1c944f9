"""ScaleLLM: an LLM serving engine whose whole request path is built for latency under concurrency."""
__version__ = "0.1.0"

# The public names load on first use, so a process that needs none of them (the gateway) never
# imports torch and transformers.
_EXPORTS = {"LLM": "scalellm.llm", "LoRARequest": "scalellm.lora_request", "CompletionOutput": "scalellm.outputs",
            "Logprob": "scalellm.outputs", "RequestOutput": "scalellm.outputs",
            "PoolingParams": "scalellm.pooling_params", "SamplingParams": "scalellm.sampling_params"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scalellm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
