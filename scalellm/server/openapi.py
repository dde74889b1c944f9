"""GET /openapi.json: an OpenAPI 3.1 description of the server's routes.

Request and response bodies come from the msgspec Structs in protocol.py, so the document follows the
wire format as it changes. Every error a route answers has protocol.ErrorResponse's shape.
"""
from __future__ import annotations

from collections.abc import Callable, Collection

import msgspec
from aiohttp import web

from scalellm import __version__
from scalellm.server import protocol as P

_REF = "#/components/schemas/{name}"
_STRUCTS = (P.CompletionRequest, P.ChatCompletionRequest, P.TokenizeRequest, P.DetokenizeRequest,
            P.CompletionResponse, P.ChatCompletionResponse, P.EmbeddingRequest, P.EmbeddingResponse, P.LoadLoRARequest, P.UnloadLoRARequest, P.ModelList, P.ModelCard, P.ErrorResponse)
_ERRORS = {400: "The request is malformed or asks for something the server refuses",
           401: "The API key is missing or wrong", 404: "The model does not exist",
           413: "The request body is too large", 503: "The model is loading, the server is at capacity or draining"}
_GENERATE = (400, 404, 413, 503)  # what a request with a body naming a model may be answered with
# in OpenAPI 3.1 an event stream's schema describes one event
_SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}},
                                         "required": ["data"]}}}
# a prompt is a string, strings, token ids or lists of token ids (msgspec allows one array type per union)
_PROMPT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                     {"type": "array", "items": {"type": "integer"}},
                     {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}


def _ref(name: str) -> dict:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _object(**properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties)}


_INT, _STR, _ANY_OBJECT = {"type": "integer"}, {"type": "string"}, {"type": "object"}


def _operation(summary: str, ok: dict, errors: tuple[int, ...] = (), body: str | None = None, **extra) -> dict:
    """One operation: `ok` is the 200 response's content, `errors` the statuses with an error body."""
    op = {"summary": summary, "responses": {"200": {"description": "OK", "content": ok}}, **extra}
    for status in errors:
        op["responses"][str(status)] = {"description": _ERRORS[status], "content": _json(_ref("ErrorResponse"))}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    return op


def _paths() -> dict[str, dict[str, dict]]:
    model_param = {"name": "model", "in": "path", "required": True, "schema": _STR,
                   "description": "The served model name, the model's path or its folder's name"}
    tokens = _object(tokens={"type": "array", "items": _INT}, count=_INT, max_model_len=_INT)
    load = _object(num_requests_running=_INT, num_requests_waiting=_INT, kv_cache_usage={"type": "number"},
                   in_flight=_INT)
    health = _operation("200 while serving, 503 while loading or draining", _json(_object(status=_STR)),
                        operationId="health")
    health["responses"]["503"] = {"description": "Loading or draining", "content": _json(_object(status=_STR))}
    return {
        "/v1/completions": {"post": _operation(
            "Complete a prompt (stream: server-sent events)", {**_json(_ref("CompletionResponse")), **_SSE},
            _GENERATE, "CompletionRequest", operationId="createCompletion")},
        "/v1/chat/completions": {"post": _operation(
            "Answer a conversation (stream: server-sent events)", {**_json(_ref("ChatCompletionResponse")), **_SSE},
            _GENERATE, "ChatCompletionRequest", operationId="createChatCompletion")},
        "/v1/embeddings": {"post": _operation(
            "Embed inputs: each one's pooled final hidden state", _json(_ref("EmbeddingResponse")), _GENERATE,
            "EmbeddingRequest", operationId="createEmbedding")},
        "/v1/load_lora_adapter": {"post": _operation(
            "Load a LoRA adapter (with --enable-lora)", {"text/plain": {"schema": _STR}}, (400, 413, 503),
            "LoadLoRARequest", operationId="loadLoraAdapter")},
        "/v1/unload_lora_adapter": {"post": _operation(
            "Unload a LoRA adapter: new requests for it are refused, running ones finish",
            {"text/plain": {"schema": _STR}}, (400, 404, 413, 503), "UnloadLoRARequest",
            operationId="unloadLoraAdapter")},
        "/v1/models": {"get": _operation("List the served model", _json(_ref("ModelList")), (503,),
                                         operationId="listModels")},
        "/v1/models/{model}": {"get": _operation("Describe the served model", _json(_ref("ModelCard")), (404, 503),
                                                 operationId="retrieveModel", parameters=[model_param])},
        "/version": {"get": _operation("The server's version", _json(_object(version=_STR)),
                                       operationId="version")},
        "/health": {"get": health},
        "/metrics": {"get": _operation("Prometheus metrics", {"text/plain": {"schema": _STR}}, operationId="metrics")},
        "/load": {"get": _operation("The engine's load, cheaper to poll than /metrics", _json(load), (503,),
                                    operationId="load")},
        "/tokenize": {"post": _operation("Token ids of a prompt or of a conversation after its chat template",
                                         _json(tokens), _GENERATE, "TokenizeRequest", operationId="tokenize")},
        "/detokenize": {"post": _operation("The text of token ids", _json(_object(prompt=_STR)), _GENERATE,
                                           "DetokenizeRequest", operationId="detokenize")},
        "/dashboard": {"get": _operation("The live dashboard's page", {"text/html": {"schema": _STR}},
                                         operationId="dashboard")},
        "/dashboard/snapshot": {"get": _operation("The dashboard's latest point",
                                                  _json(_object(point=_ANY_OBJECT, info=_ANY_OBJECT)),
                                                  operationId="dashboardSnapshot")},
        "/dashboard/stream": {"get": _operation("The dashboard's points, one a second (server-sent events)", _SSE,
                                                operationId="dashboardStream")},
        "/openapi.json": {"get": _operation("This document", _json(_ANY_OBJECT), operationId="openapi")},
    }


def _secure(paths: dict[str, dict[str, dict]], public: Collection[str]) -> None:
    """Mark `public` paths as needing no key and give the others their 401."""
    for path, operations in paths.items():
        for op in operations.values():
            if path in public:
                op["security"] = []
            else:
                op["responses"]["401"] = {"description": _ERRORS[401], "content": _json(_ref("ErrorResponse"))}


def openapi_document(api_key: bool = True, public_paths: Collection[str] = ()) -> dict:
    """The OpenAPI 3.1 document. With `api_key`, every path but `public_paths` needs a bearer token."""
    _, schemas = msgspec.json.schema_components(_STRUCTS, ref_template=_REF)
    schemas["CompletionRequest"]["properties"]["prompt"] = _PROMPT
    schemas["EmbeddingRequest"]["properties"]["input"] = _PROMPT
    paths = _paths()
    doc = {"openapi": "3.1.0",
           "info": {"title": "ScaleLLM", "version": __version__,
                    "description": "An OpenAI-compatible LLM server. Errors have OpenAI's shape: "
                                   '{"error": {"message", "type", "param", "code"}}.'},
           "paths": paths, "components": {"schemas": schemas}}
    if api_key:
        _secure(paths, public_paths)
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def openapi_handler(build: Callable[[], dict]):
    """A handler answering with build()'s document, built and encoded on the first request only."""
    body: bytes | None = None

    async def handler(request: web.Request) -> web.Response:
        nonlocal body
        if body is None:
            body = msgspec.json.encode(build())
        return web.Response(body=body, content_type="application/json")

    return handler
