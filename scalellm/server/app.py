"""The aiohttp application: auth, admission control, and the small endpoints (the process around it:
lifecycle.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from scalellm import __version__
from scalellm.engine.async_engine import AsyncEngine
from scalellm.server import protocol as P
from scalellm.server.dashboard import Dashboard
from scalellm.server.errors import APIError, decode_body, respond
from scalellm.server.formatting import LogprobFormatter
from scalellm.server.limits import RequestLimits, longest_token_chars
from scalellm.server.metrics import Metrics
from scalellm.server.openapi import openapi_document, openapi_handler
from scalellm.server.request_log import request_line, request_log
from scalellm.server.chat import chat_conversation
from scalellm.server.chat_templates import template_for
from scalellm.server.embeddings import EmbeddingServing
from scalellm.server.lora_routes import LoRARoutes
from scalellm.server.serving import RECORD, OpenAIServing

log = logging.getLogger("scalellm.server")
TOKENIZE_BACKLOG_CHARS = 8 << 20  # prompt characters being tokenized at once before new requests get 503
# probes, scrapes and the dashboard: neither counted nor logged
_UNCOUNTED = frozenset({"/health", "/metrics", "/load", "/dashboard", "/dashboard/stream", "/dashboard/snapshot"})
# with an API key set, the only paths answered without it: probes and the dashboard's page (its data needs the key)
PUBLIC_PATHS = frozenset({"/health", "/version", "/dashboard"})


class Server:
    def __init__(self, api_key: str | None = None, served_model_name: str | None = None,
                 max_queue_len: int = 256, max_body_bytes: int = 8 << 20, log_requests: bool = True,
                 model_path: str | None = None, chat_template: str | None = None, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False, limits: RequestLimits | None = None,
                 stream_buffer_bytes: int = 1 << 20):
        self.api_key = api_key
        self.limits = limits or RequestLimits()
        # a stream whose client leaves more than this unread is disconnected (its request aborted)
        self.stream_buffer_bytes = stream_buffer_bytes
        self.stream_backlog = max(64, stream_buffer_bytes // 256)  # the same in deltas, where frames wait unmade
        self.longest_token_chars = 0  # known once loaded: bounds a text's tokens before tokenizing it
        self.tokenizing_chars = 0  # characters of prompt text in the tokenizer pool now
        self.chat_template = chat_template  # --chat-template's text: replaces the model's own
        # tool_choice "auto" reads calls with this parser; None: "auto" is refused
        self.auto_tool_parser = tool_call_parser if enable_auto_tool_choice else None
        self.served_model_name = served_model_name
        self.max_queue_len = max_queue_len
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        self.state = "loading"  # loading -> serving -> draining
        self.engine: AsyncEngine | None = None
        self.tokenizer = None
        self.formatter: LogprobFormatter | None = None
        # The name metrics carry while loading (requests are refused then): the same as once loaded.
        self.model_name = served_model_name or (model_base_name(model_path) if model_path else "")
        self.model_aliases: set[str] = set()
        self.in_flight = 0  # sequences (prompts x n) admitted and not yet answered
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="scalellm-tokenize")
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None, self.model_name)
        self.serving = OpenAIServing(self)
        self.embedding_serving = EmbeddingServing(self)
        self.lora = LoRARoutes(self)
        self.dashboard = Dashboard(self)
        self.flags: dict = {}  # the command line's settings, shown on the dashboard
        self.created = int(time.time())

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.formatter = LogprobFormatter(self.tokenizer)
        path = engine.engine.loaded.path
        base = model_base_name(path)
        self.model_name = self.served_model_name or base
        self.model_aliases = {self.model_name, path, base}
        self.metrics.bind(self.model_name)
        self.longest_token_chars = longest_token_chars(self.tokenizer)
        with contextlib.suppress(Exception):  # compile the chat template now, not on the first chat request
            self.apply_chat_template([{"role": "user", "content": "hi"}])
        engine.start()
        self.state = "serving"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._middleware])
        s = self.serving
        app.router.add_post("/v1/completions", s.completions)
        app.router.add_post("/v1/chat/completions", s.chat)
        app.router.add_post("/v1/embeddings", self.embedding_serving.embeddings)
        app.router.add_post("/v1/load_lora_adapter", self.lora.load)
        app.router.add_post("/v1/unload_lora_adapter", self.lora.unload)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/version", self.version)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/load", self.load)
        app.router.add_get("/dashboard", self.dashboard.page)
        app.router.add_get("/dashboard/stream", self.dashboard.stream, allow_head=False)  # an endless stream
        app.router.add_get("/dashboard/snapshot", self.dashboard.snapshot)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/openapi.json", openapi_handler(lambda: openapi_document(bool(self.api_key), PUBLIC_PATHS)))
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        start = time.monotonic()
        status, message = 499, None  # 499: the client left before an answer (as nginx logs it)
        try:
            response, message = await respond(request, handler, self.api_key, PUBLIC_PATHS, self.max_body_bytes)
            status = response.status
            return response
        finally:
            if request.path not in _UNCOUNTED:
                self._account(request, status, message, time.monotonic() - start)

    def _account(self, request: web.Request, status: int, message: str | None, seconds: float) -> None:
        """Count the request by outcome and status, and log its line."""
        record = request.get(RECORD)  # set once a generation request is admitted
        if status == 499:
            outcome = "aborted"
        elif record is not None:
            outcome = record.outcome if status < 400 else "error"
        elif status >= 400:
            outcome = "rejected" if status < 500 or status == 503 else "error"
        else:
            outcome = "ok"
        self.metrics.count_request(outcome, status)
        if self.log_requests and (record is not None or status >= 400):  # generation requests and errors
            request_log.info(request_line(request.method, request.path, status, outcome, seconds, record, message,
                                                  request.headers.get("x-request-id")))

    # -- helpers used by the handlers ----------------------------------------------------------
    def check_ready(self) -> None:
        if self.state == "loading":
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        if self.state == "draining":
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_aliases:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def admit(self, count: int) -> None:
        """Take `count` sequences (prompts x n) of the server's capacity, or refuse: 503 while it is full,
        400 for a request that could never fit."""
        limit = self.engine.engine.config.max_num_seqs + self.max_queue_len
        if count > limit:
            raise APIError(400, f"this request asks for {count} sequences (prompts x n); the server holds at most "
                                f"{limit} at once", param="n")
        if self.in_flight + count > limit:
            raise APIError(503, "the server is at capacity; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count

    @contextlib.contextmanager
    def admitted(self, count: int):
        self.admit(count)
        try:
            yield
        finally:
            self.release(count)

    @contextlib.contextmanager
    def tokenizing(self, chars: int):
        """Hold `chars` of the tokenizer pool's backlog while a request's text is tokenized: past
        TOKENIZE_BACKLOG_CHARS a request waits for nothing, it gets a 503 at once."""
        if self.tokenizing_chars and self.tokenizing_chars + chars > TOKENIZE_BACKLOG_CHARS:
            raise APIError(503, "the server is busy tokenizing; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.tokenizing_chars += chars
        try:
            yield
        finally:
            self.tokenizing_chars -= chars

    def check_fits(self, chars: int, param: str) -> None:
        """A 400 for a prompt of `chars` characters: too long for the context window whatever its tokens
        (checked before tokenizing)."""
        bound = self.engine.engine.max_model_len * self.longest_token_chars
        if chars > bound:
            raise APIError(400, f"the {param} is longer than the model's context of {self.engine.engine.max_model_len}"
                                f" tokens can hold", param=param)

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t) for t in texts]

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, options: dict | None = None) -> list[int]:
        options = dict(options or {})
        reserved = sorted(set(options) & _RESERVED_TEMPLATE_ARGS)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        template = (options.pop("chat_template", None) or self.chat_template
                    or template_for(self.tokenizer, conversation, tools))
        try:
            ids = self.tokenizer.apply_chat_template(conversation, tools=tools, chat_template=template,
                                                     add_generation_prompt=add_generation_prompt, tokenize=True,
                                                     **options)
        except Exception as e:  # the template itself may reject a conversation
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # -- small endpoints -----------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.engine is not None and self.engine.dead is not None:
            return web.json_response({"status": "failed", "error": str(self.engine.dead)}, status=503)
        if self.state != "serving":
            return web.json_response({"status": self.state}, status=503)
        return web.json_response({"status": "ok"})

    async def load(self, request: web.Request) -> web.Response:
        """The engine's load for routers polling fast: cheaper than parsing /metrics."""
        self.check_ready()
        s = self.engine.engine.stats()
        return web.json_response({"num_requests_running": s["num_running"], "num_requests_waiting": s["num_waiting"],
                                  "kv_cache_usage": s["kv_cache_usage"], "in_flight": self.in_flight})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def models(self, request: web.Request) -> web.Response:
        self.check_ready()
        card = P.ModelCard(self.model_name, self.created, self.engine.engine.max_model_len)
        return web.Response(body=P.encoder.encode(P.ModelList([card] + self.lora.cards())),
                            content_type="application/json")

    async def model(self, request: web.Request) -> web.Response:
        self.check_ready()
        name = request.match_info["model"]
        card = next((c for c in self.lora.cards() if c.id == name), None)
        if card is None:
            self.check_model(name)
            card = P.ModelCard(self.model_name, self.created, self.engine.engine.max_model_len)
        return web.Response(body=P.encoder.encode(card), content_type="application/json")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def tokenize(self, request: web.Request) -> web.Response:
        self.check_ready()
        req = decode_body(P.tokenize_decoder, await request.read())
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            ids = await self.run_blocking(
                lambda: self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        else:
            ids = await self.run_blocking(self.apply_chat_template, chat_conversation(req.messages),
                                          req.add_generation_prompt)
        return web.json_response({"tokens": ids, "count": len(ids),
                                  "max_model_len": self.engine.engine.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        self.check_ready()
        req = decode_body(P.detokenize_decoder, await request.read())
        self.check_model(req.model)
        vocab = self.engine.engine.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", param="tokens")
        text = await self.run_blocking(self.tokenizer.decode, req.tokens)
        return web.json_response({"prompt": text})


_RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "tools", "tokenize", "return_dict", "padding", "truncation",
                                     "max_length", "return_tensors", "tokenizer_kwargs", "return_assistant_tokens_mask",
                                     "add_generation_prompt"})


def model_base_name(path: str) -> str:
    """What a model is called by default: its folder's name, or its GGUF file's up to the first dot."""
    base = os.path.basename(path.rstrip("/"))
    return base.split(".")[0] if base.endswith(".gguf") else base
