"""POST /v1/completions and /v1/chat/completions: validate, tokenize off the loop, run, format."""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from scalellm.outputs import Logprob
from scalellm.sampling_params import SamplingParams
from scalellm.engine.async_engine import EngineDead, RequestFailed, SlowReader
from scalellm.server import protocol as P
from scalellm.server.chat import chat_conversation, chat_message, template_options
from scalellm.server.constraints import logits_fields, refuse_unsupported, request_constraint
from scalellm.server.errors import APIError, bad_value, decode_body, error_body
from scalellm.server.limits import chat_chars, prompt_count
from scalellm.server.metrics import RequestRecord
from scalellm.server.resume import TOKEN_IDS_HEADER, continuation, finished_tokens
from scalellm.server.sse import DirectStream, Framer, sse
from scalellm.server.streams import merged_deltas
from scalellm.server.tool_choice import plan_tools

log = logging.getLogger("scalellm.server")
RECORD = web.RequestKey("scalellm.record", RequestRecord)  # a generation request's record, kept in its aiohttp request
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
DONE = b"data: [DONE]\n\n"
ENGINE_ERRORS = (RequestFailed, EngineDead)


@dataclass
class Choice:
    """What has been produced for one choice of a non-streamed response."""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[Logprob | None] | None = None


def sampling_params(req, max_tokens: int | None, logprobs: int | None, constraint=None,
                    num_prompts: int = 1, prompt_logprobs: int | None = None, lora: str | None = None) -> SamplingParams:
    resumed = continuation(req, req.n, num_prompts)
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=constraint,
            continuation=resumed, lora_name=lora, **logits_fields(req))
    except ValueError as e:
        raise bad_value(e) from None


def _is_token_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class OpenAIServing:
    def __init__(self, server):
        self.server = server

    # -- completions ---------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        srv = self.server
        req, t1, stages, lora = await self._read(request, P.completion_decoder)
        num_prompts = prompt_count(req.prompt)
        srv.limits.check(req, num_prompts, req.logprobs, "logprobs")
        refuse_unsupported(req)
        param, constraint = request_constraint(req)
        echoed = req.logprobs if req.echo else None  # echo with logprobs scores the prompt's tokens too
        prompt_k = max((k for k in (req.prompt_logprobs, echoed) if k is not None), default=None)
        params = sampling_params(req, req.max_tokens, req.logprobs, constraint, num_prompts, prompt_k, lora)
        lengths = [len(req.prompt)] if isinstance(req.prompt, str) else [len(p) for p in req.prompt
                                                                          if isinstance(p, str)]
        if req.truncate_prompt_tokens is None:  # (truncated prompts are checked once cut)
            srv.check_fits(max(lengths, default=0), "prompt")
        with srv.admitted(num_prompts * params.n):  # before the costly part: compiling, tokenizing
            await self._compile(params, param)
            with srv.tokenizing(sum(lengths)):
                prompts = await self._completion_prompts(req.prompt)
            stages["tokenize"] = time.monotonic() - t1
            return await self._run(request, "completion", req, prompts, params, stages)

    async def _completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            texts: list = [prompt]
        elif _is_token_list(prompt) and prompt:
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif prompt and all(_is_token_list(p) for p in prompt):
            texts = list(prompt)
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, list of token ids, "
                                "or list of token id lists", param="prompt")
        if any(isinstance(t, str) and not t for t in texts) or any(isinstance(t, list) and not t for t in texts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        to_encode = [t for t in texts if isinstance(t, str)]
        encoded = iter(await self.server.run_blocking(self.server.encode_many, to_encode) if to_encode else [])
        return [(t, next(encoded)) if isinstance(t, str) else (None, t) for t in texts]

    # -- chat ----------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        srv = self.server
        req, t1, stages, lora = await self._read(request, P.chat_decoder)
        srv.limits.check(req, 1, req.top_logprobs, "top_logprobs")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        refuse_unsupported(req)
        tools = plan_tools(req, srv.auto_tool_parser)
        param, constraint = request_constraint(req)
        if tools.forced:
            if constraint is not None:
                raise APIError(400, f"tool_choice forces a tool call; {param} cannot constrain the same reply",
                               param=param)
            param, constraint = "tool_choice", tools.constraint
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, constraint,
                                 prompt_logprobs=req.prompt_logprobs, lora=lora)
        conversation = chat_conversation(req.messages)  # checked before the costlier compile
        chars = chat_chars(conversation)
        if req.truncate_prompt_tokens is None:
            srv.check_fits(chars, "messages")
        with srv.admitted(params.n):
            await self._compile(params, param)
            with srv.tokenizing(chars):
                ids = await srv.run_blocking(srv.apply_chat_template, conversation, req.add_generation_prompt,
                                             tools.tools, template_options(req))
            stages["tokenize"] = time.monotonic() - t1
            return await self._run(request, "chat", req, [(None, ids)], params, stages, tools)

    # -- shared --------------------------------------------------------------------------------
    async def _compile(self, params: SamplingParams, param: str) -> None:
        """Compile the request's grammar on the worker pool (cached by constraint); a 400 if invalid."""
        if params.structured_outputs is None:
            return
        grammars = self.server.engine.engine.grammars
        try:
            params.compiled_grammar = await self.server.run_blocking(grammars.compile, params.structured_outputs, param)
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None) or param) from None
        self.server.metrics.count_constrained(params.structured_outputs.kind)

    async def _read(self, request: web.Request, decoder):
        """Decode the body into its Struct; returns (request, time parsed, stage times so far, the LoRA
        adapter its model names or None)."""
        self.server.check_ready()
        start = time.monotonic()
        req = decode_body(decoder, await request.read())
        parsed = time.monotonic()
        lora = self.server.lora.adapter_for(req.model)  # a LoRA adapter, None for the base model, 404 for neither
        return req, parsed, {"parse": parsed - start}, lora

    async def _run(self, request, kind, req, prompts, params, stages, tools=None) -> web.StreamResponse:
        srv = self.server
        if req.truncate_prompt_tokens is not None:
            prompts = truncated(prompts, req.truncate_prompt_tokens, srv.engine.engine.max_model_len)
        for _, ids in prompts:
            try:
                srv.engine.engine.validate_prompt(ids, params)
            except ValueError as e:
                raise bad_value(e, "prompt") from None
        if req.resume is not None:  # the stream goes on under its id (the engine's own id stays unique)
            rid, created = req.resume.id, req.resume.created
            engine_rid = f"{rid}-resumed-{uuid.uuid4().hex[:12]}"
        else:
            rid = engine_rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
            created = int(time.time())
        stages.update(write=0.0)
        record = request[RECORD] = RequestRecord(rid)
        if req.stream:
            def on_overflow(e):
                self._drop_slow_reader(request, record, e)
            merged = merged_deltas(srv.engine, engine_rid, prompts, params, srv.stream_backlog, on_overflow)
        else:
            merged = merged_deltas(srv.engine, engine_rid, prompts, params)
        deltas = srv.metrics.track(merged, len(prompts) * params.num_to_run, stages, record)
        try:
            if req.stream:
                return await self._stream(request, kind, req, rid, created, prompts, params, deltas, stages, record,
                                          tools, engine_rid)
            return await self._collect(kind, req, rid, created, prompts, params, deltas, tools)
        except ENGINE_ERRORS as e:
            raise self.engine_error(e) from None
        finally:
            srv.metrics.add_stages(stages)

    async def _collect(self, kind, req, rid, created, prompts, params, deltas, tools=None) -> web.Response:
        n = params.n
        choices = [Choice() for _ in range(len(prompts) * n)]
        async with contextlib.aclosing(deltas) as stream:
            async for batch in stream:
                for i, d in batch:
                    c = choices[i * n + d.index]
                    c.text.append(d.text)
                    c.token_ids += d.token_ids
                    if d.logprobs:
                        c.logprobs += d.logprobs
                    if d.prompt_logprobs is not None:
                        c.prompt_logprobs = d.prompt_logprobs
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        usage = _usage(prompts, choices)
        fmt = self.server.formatter
        if kind == "completion":
            out = []
            for idx, c in enumerate(choices):
                text, ids = prompts[idx // n]
                echo = (text if text is not None else fmt.decode(ids)) if req.echo else ""
                lp = None
                if req.echo and params.logprobs is not None and c.prompt_logprobs is not None:
                    lp = fmt.echo_logprobs(ids, c.prompt_logprobs, params.logprobs, c.logprobs, len(echo))
                elif params.logprobs is not None:
                    lp = fmt.completion_logprobs(c.logprobs, len(echo))
                choice = P.CompletionChoice(idx, echo + "".join(c.text), lp, c.finish_reason, c.stop_reason)
                if req.return_token_ids:
                    choice.prompt_token_ids, choice.token_ids = prompts[idx // n][1], c.token_ids
                if req.prompt_logprobs is not None and c.prompt_logprobs is not None:
                    choice.prompt_logprobs = fmt.prompt_logprobs(c.prompt_logprobs, req.prompt_logprobs)
                out.append(choice)
            body = P.CompletionResponse(rid, created, params.lora_name or self.server.model_name, out, usage=usage)
        else:
            new_parser = tools.new_parser if tools is not None else None
            out = []
            for idx, c in enumerate(choices):
                message, finish = chat_message("".join(c.text), c.finish_reason, new_parser, tools)
                out.append(P.ChatChoice(idx, message, fmt.chat_logprobs(c.logprobs) if params.logprobs is not None
                                        else None, finish, c.stop_reason,
                                        c.token_ids if req.return_token_ids else msgspec.UNSET))
            body = P.ChatCompletionResponse(rid, created, params.lora_name or self.server.model_name, out, usage=usage)
            if req.return_token_ids:
                body.prompt_token_ids = prompts[0][1]
            if req.prompt_logprobs is not None and choices[0].prompt_logprobs is not None:
                body.prompt_logprobs = fmt.prompt_logprobs(choices[0].prompt_logprobs, req.prompt_logprobs)
        return web.Response(body=P.encoder.encode(body), content_type="application/json")

    async def _stream(self, request, kind, req, rid, created, prompts, params, deltas, stages,
                      record, tools, engine_rid: str) -> web.StreamResponse:
        model, fmt, n = params.lora_name or self.server.model_name, self.server.formatter, params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_field = None if include_usage else msgspec.UNSET
        token_events = request.headers.get(TOKEN_IDS_HEADER) == "1"
        resp = web.StreamResponse(headers={**SSE_HEADERS, TOKEN_IDS_HEADER: "1"} if token_events else SSE_HEADERS)
        # one prompt streams straight from the step's hand-over (DirectStream), in HTTP/1.1's chunks
        direct = len(prompts) == 1 and request.version >= (1, 1)
        if direct:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        framer = Framer(kind, rid, created, model, fmt, n, usage_field, [0] * (len(prompts) * n))
        if tools is not None and tools.new_parser is not None:
            framer.stream_tool_calls(tools.new_parser, tools.parallel)
        if req.return_token_ids:
            framer.return_token_ids([ids for _, ids in prompts])
        framer.prompt_logprobs = req.prompt_logprobs
        if kind == "completion" and req.echo and params.logprobs is not None:
            framer.echo_logprobs, framer.echo_top = [ids for _, ids in prompts], params.logprobs
        framer.token_events = token_events
        resumed = req.resume is not None  # its client has the opening chunks already
        framer.completion_tokens += finished_tokens(req)
        try:
            if kind == "chat" and not resumed:
                first = [P.ChatChunkChoice(i, P.ChatDelta(role="assistant", content="")) for i in range(n)]
                prompt_ids = prompts[0][1] if req.return_token_ids else msgspec.UNSET
                await resp.write(sse(P.ChatCompletionChunk(rid, created, model, first, usage=usage_field,
                                                           prompt_token_ids=prompt_ids)))
            elif kind == "completion" and req.echo:
                for idx in range(len(prompts) * n):
                    text, ids = prompts[idx // n]
                    echo = text if text is not None else fmt.decode(ids)
                    framer.offsets[idx] = len(echo)
                    if not resumed:
                        choice = P.CompletionChoice(idx, echo)
                        await resp.write(sse(P.CompletionResponse(rid, created, model, [choice], usage=usage_field)))
            if not params.num_to_run:  # every choice had finished: what is left is the usage and [DONE]
                await deltas.aclose()
            elif direct:
                await self._stream_direct(request, prompts[0], params, engine_rid, framer, stages, record)
            else:
                async with contextlib.aclosing(deltas) as stream:
                    async for batch in stream:
                        frames = [framer.frame(i, d) for i, d in batch]
                        data = frames[0] if len(frames) == 1 else b"".join(frames)
                        if data:
                            t = time.monotonic()
                            await resp.write(data)
                            stages["write"] += time.monotonic() - t
            if include_usage:
                prompt_tokens = sum(len(ids) for _, ids in prompts)
                completion_tokens = framer.completion_tokens
                usage = P.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
                cls = P.ChatCompletionChunk if kind == "chat" else P.CompletionResponse
                await resp.write(sse(cls(rid, created, model, [], usage=usage)))
            await resp.write(DONE)
            await resp.write_eof()
        except SlowReader as e:
            self._drop_slow_reader(request, record, e)
            return resp
        except ConnectionResetError:
            record.outcome = "aborted"
            return resp  # the client left; closing the stream above aborted its requests
        except Exception as e:  # the headers are sent: the error becomes the stream's last event
            record.outcome = "error"
            await self._end_stream_with_error(resp, e)
        return resp

    async def _stream_direct(self, request, prompt, params, rid, framer, stages, record) -> None:
        """Run one prompt with its frames written by a DirectStream; returns once every choice finished."""
        engine = self.server.engine
        tracker = self.server.metrics.tracker(params.num_to_run, stages, record)
        sink = DirectStream(request.transport, framer, tracker, params.num_to_run, stages,
                            self.server.stream_buffer_bytes)
        text, ids = prompt
        finished = False
        try:
            engine.open_stream(rid, ids, params, text, sink)
            await sink.done
            finished = True
        finally:
            engine.close_stream(rid, finished)
            tracker.close()

    def _drop_slow_reader(self, request: web.Request, record: RequestRecord, e: SlowReader) -> None:
        """Disconnect a stream's client that fell too far behind (the handler, blocked writing to it or
        not, then ends and aborts its requests); counted once."""
        if record.outcome == "slow_reader":
            return
        record.outcome = "slow_reader"
        self.server.metrics.count_slow_reader()
        log.warning("%s: the client reads too slowly (%s); disconnecting it", record.request_id, e)
        if request.transport is not None:
            request.transport.abort()

    def engine_error(self, e: Exception) -> APIError:
        """What a client is told when the engine ended its request (the traceback is in the server's log)."""
        if isinstance(e, RequestFailed):
            self.server.metrics.count_engine_failure(e.stage)
        code = "engine_dead" if isinstance(e, EngineDead) else "engine_error"
        return APIError(500, f"{e}; the request was ended", code=code)

    async def _end_stream_with_error(self, resp: web.StreamResponse, e: Exception) -> None:
        if isinstance(e, ENGINE_ERRORS):
            e = self.engine_error(e)
        if isinstance(e, APIError):
            body = error_body(e.status, e.message, e.param, e.code)
        else:
            log.error("request failed mid-stream: %s", e)
            body = error_body(500, "internal server error")
        with contextlib.suppress(ConnectionResetError):
            await resp.write(sse(body))
            await resp.write_eof()


def truncated(prompts: list[tuple[str | None, list[int]]], keep: int, max_model_len: int) -> list:
    """vLLM's truncate_prompt_tokens: each prompt's last `keep` tokens (-1: as many as the context holds)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < -1 or keep == 0:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or at least 1, got {keep!r}",
                       param="truncate_prompt_tokens")
    keep = max_model_len - 1 if keep == -1 else keep
    return [(text, ids) if len(ids) <= keep else (None, ids[-keep:]) for text, ids in prompts]


def _usage(prompts, choices: list[Choice]) -> P.Usage:
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return P.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
