"""python -m scalellm.server (or `scalellm serve`): an OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from scalellm.config import EngineConfig
from scalellm.server.limits import RequestLimits

TOOL_PARSERS = ("hermes", "llama3_json", "mistral")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help: argparse's own, unless the help already says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser(prog: str = "python -m scalellm.server", model_positional: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, formatter_class=_HelpFormatter,
                                 description="OpenAI-compatible LLM server (completions, chat, streaming).")
    if model_positional:
        ap.add_argument("model_arg", nargs="?", metavar="MODEL", default=None,
                        help="model folder or .gguf file (same as --model); default: the bundled SmolLM2")
    ap.add_argument("--model", default=None,
                    help="model folder (config.json + safetensors + tokenizer) or .gguf file; nothing is "
                         "downloaded; default: the bundled SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind")
    ap.add_argument("--port", type=int, default=8000, help="port")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the model runs; cuda needs a GPU and CuPy (pip install -e '.[cuda]')")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "q8_0", "q4_0"],
                    help="weight formats: auto serves a GGUF's Q8_0/Q4_0/Q4_1 tensors as stored (others dequantized);"
                         " none dequantizes everything to --dtype; q8_0/q4_0 quantize the projections at load")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weight and activation dtype; auto: the checkpoint's (bfloat16 for GGUF on cpu; float32 for "
                         "weights served block-quantized)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*; default: none")
    ap.add_argument("--served-model-name", default=None,
                    help="model name reported and accepted by the API; default: the file or folder name")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context length (prompt + output); default: the model's own")
    ap.add_argument("--kv-cache-memory", default="2GiB",
                    help="memory for the paged KV cache, in bytes or with a unit (e.g. 4GB, 512MiB)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512,
                    help="token budget per step, shared by decodes and prefill chunks")
    ap.add_argument("--mixed-prefill-tokens", type=int, default=None,
                    help="most prompt tokens a step carries when it also carries decodes: bounds running streams' "
                         "inter-token latency while new prompts arrive; default: no cap beyond the step budget")
    ap.add_argument("--block-size", type=int, default=None,
                    help="tokens per KV-cache block; default: 128 on the CPU, 16 on CUDA")
    ap.add_argument("--num-threads", type=int, default=None,
                    help="compute threads for the model step; default: one per core")
    ap.add_argument("--cuda-graph-max-batch", type=int, default=256,
                    help="on cuda, decode batches up to this size replay CUDA graphs; 0: run every step eagerly")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="schedule and launch step N+1 before reading step N's tokens (one step ahead); "
                         "default: on with --device cuda, unless speculative decoding is on")
    ap.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt prefixes")
    ap.add_argument("--max-queue-len", type=int, default=256,
                    help="requests that may wait beyond --max-num-seqs before new ones get 503")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest accepted request body")
    lim = RequestLimits()
    ap.add_argument("--max-n", type=int, default=lim.max_n, help="most samples (n) per prompt")
    ap.add_argument("--max-prompts-per-request", type=int, default=lim.max_prompts_per_request,
                    help="most prompts in one /v1/completions prompt list")
    ap.add_argument("--max-logprobs", type=int, default=lim.max_logprobs,
                    help="most logprobs / top_logprobs a request may ask for")
    ap.add_argument("--max-stop-sequences", type=int, default=lim.max_stop_sequences,
                    help="most stop strings per request")
    ap.add_argument("--max-stop-length", type=int, default=lim.max_stop_chars,
                    help="most characters in one stop string")
    ap.add_argument("--max-stop-token-ids", type=int, default=lim.max_stop_token_ids,
                    help="most stop_token_ids per request")
    ap.add_argument("--max-stream-buffer-bytes", type=int, default=1 << 20,
                    help="unread bytes a stream may leave waiting; a client further behind is disconnected and "
                         "its request aborted")
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds in-flight requests get to finish after SIGTERM/SIGINT; then they are aborted")
    ap.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    ap.add_argument("--log-stats-interval", type=float, default=10.0,
                    help="seconds between stats lines while busy (0: none)")
    ap.add_argument("--chat-template", default=None, metavar="FILE",
                    help="Jinja chat template file used instead of the model's own; default: the model's")
    ap.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                    help="how tool calls are read out of the model's text under tool_choice auto")
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help='allow tool_choice "auto" (needs --tool-call-parser); without it such requests get a 400')
    ap.add_argument("--structured-outputs-config", default=None, metavar="JSON",
                    help='structured outputs settings as JSON, in vLLM\'s keys: {"backend": "auto"|"guidance", '
                         '"disable_any_whitespace": true}; JSON constraints are compact (no free whitespace) '
                         'unless disable_any_whitespace is false')
    ap.add_argument("--pooler-config", default=None, metavar="JSON",
                    help='/v1/embeddings\' pooling over the model\'s own (a sentence-transformers layout, else the '
                         'last token, normalized): {"pooling_type": "MEAN"|"LAST"|"CLS", "normalize": true|false}')
    ap.add_argument("--speculative-config", default=None, metavar="JSON",
                    help='speculative decoding, in vLLM\'s form: {"method": "ngram", "num_speculative_tokens": 4, '
                         '"prompt_lookup_min": 2, "prompt_lookup_max": 5} or a draft model of the same tokenizer: '
                         '{"model": PATH, "num_speculative_tokens": 4}; optional "disable_by_batch_size": N')
    ap.add_argument("--enable-lora", action="store_true",
                    help="serve LoRA adapters, chosen by a request's model (runtime loads: /v1/load_lora_adapter)")
    ap.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                    help='LoRA adapters (PEFT folders) served from the start: name=path, or JSON '
                         '{"name": NAME, "path": PATH}')
    ap.add_argument("--max-loras", type=int, default=1, help="LoRA adapters one step may mix")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the largest LoRA rank served")
    ap.add_argument("--max-cpu-loras", type=int, default=None,
                    help="LoRA adapters kept read in memory (others are read again when used); default: --max-loras")
    ap.add_argument("--lora-kernel", default="batched", choices=["batched", "grouped"],
                    help="how a step mixing adapters computes them: two GEMMs over all slots with a mask, or a "
                         "pair per run of tokens with one adapter")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    return ap


def parse_args(argv: list[str] | None = None, prog: str = "python -m scalellm.server",
               model_positional: bool = False) -> argparse.Namespace:
    ap = build_parser(prog, model_positional)
    args = ap.parse_args(argv)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser")
    if not 0 <= args.max_logprobs <= 20:
        ap.error("--max-logprobs must be in [0, 20] (the sampling kernels return at most 20)")
    for flag in ("max_n", "max_prompts_per_request", "max_stop_length", "max_stream_buffer_bytes"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    args.compact_json = structured_outputs_config(ap, args.structured_outputs_config)
    if args.chat_template is not None:
        try:
            with open(args.chat_template) as f:
                args.chat_template_text = f.read()
        except OSError as e:
            ap.error(f"--chat-template: {e}")
    else:
        args.chat_template_text = None
    args.lora_modules = lora_modules(ap, args.lora_modules)
    if args.lora_modules and not args.enable_lora:
        ap.error("--lora-modules needs --enable-lora")
    positional = getattr(args, "model_arg", None)
    if positional is not None:
        if args.model is not None and args.model != positional:
            ap.error(f"two models given: {positional} and --model {args.model}")
        args.model = positional
    return args


def lora_modules(ap: argparse.ArgumentParser, values: list[str] | None) -> list[dict] | None:
    """--lora-modules' entries (name=path or vLLM's JSON form) as {"name", "path"} dicts."""
    if not values:
        return None
    modules = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                entry = json.loads(value)
            except json.JSONDecodeError as e:
                ap.error(f"--lora-modules: {value!r} is not valid JSON: {e}")
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                    entry.get("path"), str):
                ap.error(f"--lora-modules: {value!r} needs string fields name and path")
            modules.append({"name": entry["name"], "path": entry["path"]})
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                ap.error(f"--lora-modules: {value!r} is not name=path")
            modules.append({"name": name, "path": path})
    return modules


def request_limits(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(max_n=args.max_n, max_stop_sequences=args.max_stop_sequences,
                         max_stop_chars=args.max_stop_length, max_stop_token_ids=args.max_stop_token_ids,
                         max_prompts_per_request=args.max_prompts_per_request, max_logprobs=args.max_logprobs)


def structured_outputs_config(ap: argparse.ArgumentParser, text: str | None) -> bool:
    """--structured-outputs-config, checked; returns whether JSON constraints are compact."""
    if text is None:
        return True
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        ap.error(f"--structured-outputs-config is not valid JSON: {e}")
    if not isinstance(config, dict):
        ap.error("--structured-outputs-config must be a JSON object")
    unknown = sorted(set(config) - {"backend", "disable_any_whitespace", "disable_fallback",
                                    "disable_additional_properties", "reasoning_parser"})
    if unknown:
        ap.error(f"--structured-outputs-config: unknown keys {unknown}")
    if config.get("backend", "auto") not in ("auto", "guidance", "llguidance"):
        ap.error("--structured-outputs-config: this server's backend is llguidance (\"auto\" or \"guidance\")")
    for key in ("disable_additional_properties", "reasoning_parser"):
        if config.get(key):
            ap.error(f"--structured-outputs-config: {key} is not supported")
    return bool(config.get("disable_any_whitespace", True))


def main(argv: list[str] | None = None, prog: str = "python -m scalellm.server",
         model_positional: bool = False) -> int:
    args = parse_args(argv, prog, model_positional)
    from scalellm.model.loader import default_model_path

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              mixed_prefill_tokens=args.mixed_prefill_tokens, block_size=args.block_size,
                              kv_cache_memory=args.kv_cache_memory,
                              enable_prefix_caching=not args.no_prefix_caching, num_threads=args.num_threads,
                              cuda_graph_max_batch=args.cuda_graph_max_batch, compact_json=args.compact_json,
                              async_scheduling=args.async_scheduling,
                              speculative_config=args.speculative_config, pooler_config=args.pooler_config,
                              enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                              max_cpu_loras=args.max_cpu_loras, lora_modules=args.lora_modules,
                              lora_kernel=args.lora_kernel)
        model_path = args.model or default_model_path()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from scalellm.engine.engine import LLMEngine
    from scalellm.server.app import Server
    from scalellm.server.lifecycle import serve

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    server = Server(api_key=args.api_key, served_model_name=args.served_model_name,
                    max_queue_len=args.max_queue_len, max_body_bytes=args.max_body_bytes,
                    log_requests=not args.disable_log_requests, model_path=model_path,
                    chat_template=args.chat_template_text, tool_call_parser=args.tool_call_parser,
                    enable_auto_tool_choice=args.enable_auto_tool_choice, limits=request_limits(args),
                    stream_buffer_bytes=args.max_stream_buffer_bytes)
    server.flags = {k: v for k, v in vars(args).items() if k not in ("api_key", "model_arg", "chat_template_text")}
    return asyncio.run(serve(server, lambda: LLMEngine(config), args.host, args.port, args.shutdown_grace,
                             stats_interval=args.log_stats_interval))


if __name__ == "__main__":
    code = main()
    from scalellm.server.lifecycle import exit_process

    exit_process(code)
