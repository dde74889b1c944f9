"""One OpenAI endpoint over many ScaleLLM (or vLLM-compatible) server replicas."""
