"""ScaleLLM: an LLM serving engine whose whole request path is built for latency under concurrency."""
from scalellm.llm import LLM
from scalellm.outputs import CompletionOutput, Logprob, RequestOutput
from scalellm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
