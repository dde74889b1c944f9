"""POST /v1/embeddings: each input's pooled hidden state, in OpenAI's format.

Every input is one engine request with max_tokens 0 and a pool (engine/pooling.py): the scheduler
batches them into the same prefill steps as everything else, and each ends when its prompt is computed.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid

import numpy as np
from aiohttp import web

from scalellm.pooling_params import PoolingParams
from scalellm.sampling_params import SamplingParams
from scalellm.server import protocol as P
from scalellm.server.errors import APIError, decode_body
from scalellm.server.serving import ENGINE_ERRORS, truncated


def _inputs(value) -> list:
    """The request's inputs as a list of strings or token id lists; a 400 for any other shape."""
    def token_list(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        items = [value]
    elif token_list(value):
        items = [value]
    elif isinstance(value, list) and value and (all(isinstance(x, str) for x in value)
                                                or all(token_list(x) for x in value)):
        items = list(value)
    else:
        raise APIError(400, "input must be a non-empty string, list of strings, list of token ids, or list of "
                            "token id lists", param="input")
    if any(isinstance(x, str) and not x for x in items):
        raise APIError(400, "input must not contain empty strings", param="input")
    return items


class EmbeddingServing:
    def __init__(self, server):
        self.server = server

    async def embeddings(self, request: web.Request) -> web.Response:
        srv = self.server
        srv.check_ready()
        req = decode_body(P.embedding_decoder, await request.read())
        lora = srv.lora.adapter_for(req.model)
        items = _inputs(req.input)
        if len(items) > srv.limits.max_prompts_per_request:
            raise APIError(400, f"input holds {len(items)} items; at most {srv.limits.max_prompts_per_request} per "
                                f"request (--max-prompts-per-request)", param="input")
        try:
            pooling = PoolingParams(normalize=req.normalize, dimensions=req.dimensions)
            srv.engine.engine.pooling(pooling)
            params = SamplingParams(max_tokens=0, temperature=0.0, pooling=pooling, lora_name=lora)
        except ValueError as e:
            message = str(e)  # about dimensions, or the model's pooling (no field of the request)
            raise APIError(400, message, param="dimensions" if message.startswith("dimensions") else None) from None
        texts = [x for x in items if isinstance(x, str)]
        if req.truncate_prompt_tokens is None:
            srv.check_fits(max((len(t) for t in texts), default=0), "input")
        with srv.admitted(len(items)):
            with srv.tokenizing(sum(len(t) for t in texts)):
                encoded = iter(await srv.run_blocking(self._encode, texts, req.add_special_tokens) if texts else [])
            prompts = [(None, next(encoded)) if isinstance(x, str) else (None, x) for x in items]
            if req.truncate_prompt_tokens is not None:
                prompts = truncated(prompts, req.truncate_prompt_tokens, srv.engine.engine.max_model_len)
            for _, ids in prompts:
                try:
                    srv.engine.engine.validate_prompt(ids, params)
                except ValueError as e:  # its message speaks of the prompt
                    raise APIError(400, str(e).replace("prompt", "input", 1), param="input") from None
            rid = f"embd-{uuid.uuid4().hex}"
            try:
                vectors = await asyncio.gather(*(self._embed(f"{rid}-{i}", ids, params)
                                                 for i, (_, ids) in enumerate(prompts)))
            except ENGINE_ERRORS as e:
                raise srv.serving.engine_error(e) from None
        data = [P.Embedding(i, _encode_vector(v, req.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for _, ids in prompts)
        body = P.EmbeddingResponse(data, lora or srv.model_name, P.EmbeddingUsage(tokens, tokens), id=rid,
                                   created=int(time.time()))
        return web.Response(body=P.encoder.encode(body), content_type="application/json")

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        tokenizer = self.server.tokenizer
        return [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    async def _embed(self, request_id: str, ids: list[int], params: SamplingParams):
        async with contextlib.aclosing(self.server.engine.generate(request_id, ids, params)) as deltas:
            async for delta in deltas:
                if delta.embedding is not None:
                    return delta.embedding
        raise RuntimeError(f"request {request_id} ended without its embedding")


def _encode_vector(vector, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector.tolist()
