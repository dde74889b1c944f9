"""python -m scalellm.server: an OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from scalellm.config import EngineConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scalellm.server",
                                 description="OpenAI-compatible LLM server (completions, chat, streaming).")
    ap.add_argument("--model", default=None,
                    help="model folder (config.json + safetensors + tokenizer) or .gguf file; "
                         "default: the bundled SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weight and activation dtype; auto: the checkpoint's (bfloat16 for GGUF on cpu)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--served-model-name", default=None, help="model name reported and accepted by the API")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context length (prompt + output); default: the model's own")
    ap.add_argument("--kv-cache-memory", default="2GiB",
                    help="memory for the paged KV cache, in bytes or with a unit (e.g. 4GB, 512MiB)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512,
                    help="token budget per step, shared by decodes and prefill chunks")
    ap.add_argument("--block-size", type=int, default=None,
                    help="tokens per KV-cache block (default: 128 on the CPU, 16 on CUDA)")
    ap.add_argument("--num-threads", type=int, default=None,
                    help="compute threads for the model step (default: one per core)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt prefixes")
    ap.add_argument("--max-queue-len", type=int, default=256,
                    help="requests that may wait beyond --max-num-seqs before new ones get 503")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest accepted request body")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds in-flight requests get to finish after SIGTERM/SIGINT")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                              kv_cache_memory=args.kv_cache_memory,
                              enable_prefix_caching=not args.no_prefix_caching, num_threads=args.num_threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from scalellm.engine.engine import LLMEngine
    from scalellm.server.app import Server, serve

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    server = Server(api_key=args.api_key, served_model_name=args.served_model_name,
                    max_queue_len=args.max_queue_len, max_body_bytes=args.max_body_bytes)
    return asyncio.run(serve(server, lambda: LLMEngine(config), args.host, args.port, args.shutdown_grace))


if __name__ == "__main__":
    code = main()
    from scalellm.server.app import exit_process

    exit_process(code)
