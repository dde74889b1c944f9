"""ScaleLLM: an LLM serving engine whose whole request path is built for latency under concurrency."""
__version__ = "0.1.0"

from scalellm.llm import LLM  # noqa: E402
from scalellm.lora_request import LoRARequest  # noqa: E402
from scalellm.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from scalellm.pooling_params import PoolingParams  # noqa: E402
from scalellm.sampling_params import SamplingParams  # noqa: E402

__all__ = ["__version__", "LLM", "LoRARequest", "PoolingParams", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
