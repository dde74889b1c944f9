"""GET /openapi.json documents every route, and the server holds up when fuzzed from that document.

The fuzz test runs schemathesis against a real server process with an API key: whatever it sends, the
server must not fail with a 5xx, must answer every error in OpenAI's shape, and must stay healthy.
"""
from __future__ import annotations

import json
import os
import urllib.request

import jsonschema
import msgspec
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth, response_schema_conformance,
                                               status_code_conformance)

from scalellm.server import protocol as P
from scalellm.server.app import PUBLIC_PATHS, Server
from scalellm.server.chat import CHAT_ROLES
from scalellm.server.openapi import openapi_document
from tests.server_utils import ServerProcess

API_KEY = "openapi-fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# examples per operation in the fuzzing phase (besides the boundary cases of the coverage phase), and the seed
# fixing them all; raise the count to fuzz for longer
EXAMPLES = int(os.environ.get("SCALELLM_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("SCALELLM_FUZZ_SEED", "20240611"))
REQUEST_TIMEOUT = 20.0  # seconds; a request running longer fails the test


def app_routes() -> set[tuple[str, str]]:
    app = Server().make_app()
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, operations in doc["paths"].items() for method in operations}


def test_document_is_valid_openapi():
    doc = openapi_document(True, PUBLIC_PATHS)
    schemathesis.openapi.from_dict(doc).validate()
    for component in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(component)


def test_document_lists_exactly_the_app_routes():
    assert documented_routes(openapi_document(True, PUBLIC_PATHS)) == app_routes()


def test_public_paths_need_no_key():
    doc = openapi_document(True, PUBLIC_PATHS)
    public = {path for path, ops in doc["paths"].items() for op in ops.values() if op.get("security") == []}
    assert public == set(PUBLIC_PATHS)
    assert "security" not in openapi_document(False, PUBLIC_PATHS)


@pytest.fixture(scope="module")
def keyed_server(llama_folder):
    # A valid request costs at most 4 prompts x 2 samples x 512 tokens: a few seconds, well within the timeout.
    server = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                           "--max-model-len", "512", "--kv-cache-memory", "64MB", "--block-size", "16",
                           "--num-threads", "1", "--max-n", "2", "--max-prompts-per-request", "4",
                           "--api-key", API_KEY)
    yield server
    server.stop()


def fetch(server: ServerProcess, path: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={**AUTH, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_served_document(keyed_server):
    status, body = fetch(keyed_server, "/openapi.json")
    assert status == 200
    assert json.loads(body) == json.loads(msgspec.json.encode(openapi_document(True, PUBLIC_PATHS)))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(keyed_server.url + "/openapi.json", timeout=5)
    assert e.value.code == 401


def openai_error_body(ctx, response, case) -> None:
    """Every error is {"error": {"message": str, "type": str, "param": ..., "code": ...}}, and so is an
    error event ending a stream (which must not be an internal error)."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), response.headers
        error = msgspec.json.decode(response.content, type=P.ErrorResponse).error
        assert error.message and error.type, error
    elif content_type.startswith("text/event-stream"):
        for line in response.content.splitlines():
            if line.startswith(b"data: {") and b'"error"' in line:
                error = msgspec.json.decode(line[6:], type=P.ErrorResponse).error
                assert error.type != "internal_server_error", error


CHECKS = [not_a_server_error, openai_error_body, status_code_conformance, content_type_conformance,
          response_schema_conformance, ignored_auth]
# The document the server serves (test_served_document); the dashboard's stream never ends.
schema = schemathesis.openapi.from_dict(openapi_document(True, PUBLIC_PATHS), config=schemathesis.Config.from_dict({
    "seed": SEED,
    "headers": AUTH,
    "request-timeout": REQUEST_TIMEOUT,
    "suppress-health-check": ["all"],
    "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
})).exclude(path="/dashboard/stream")

# fields refused with a 400 whatever their value (nearly), and the spellings of an output constraint
REFUSED = {f.name for cls in (P.CompletionRequest, P.ChatCompletionRequest) for f in msgspec.structs.fields(cls)
           if f.default is msgspec.UNSET} | {"guided_whitespace_pattern"}
REQUIRED = ("prompt", "messages", "tokens", "input")  # kept in every steered body (/tokenize's prompt and messages too)
CONSTRAINTS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
               "guided_grammar")
BODY_FIELDS = {path: {f.name for f in msgspec.structs.fields(cls)} for path, cls in (
    ("/v1/completions", P.CompletionRequest), ("/v1/chat/completions", P.ChatCompletionRequest),
    ("/tokenize", P.TokenizeRequest), ("/detokenize", P.DetokenizeRequest), ("/v1/embeddings", P.EmbeddingRequest),
    ("/v1/load_lora_adapter", P.LoadLoRARequest), ("/v1/unload_lora_adapter", P.UnloadLoRARequest))}


def steered(path: str, body: dict) -> dict:
    """A schema-valid body made likelier to pass the server's own checks, to reach generation: no unknown
    or refused fields, the served model, at most one constraint, non-empty prompt and messages, known roles."""
    body = {k: v for k, v in body.items() if k in BODY_FIELDS[path] and k not in REFUSED}
    for name in [c for c in CONSTRAINTS if c in body][1:]:
        del body[name]
    if isinstance(body.get("model"), str):
        body["model"] = "tiny-llama"
    if body.get("prompt") in ("", []):
        body["prompt"] = "Hello"
    if body.get("input") in ("", []):
        body["input"] = "Hello"
    if isinstance(body.get("prompt"), str):  # /tokenize takes one of prompt and messages
        body.pop("messages", None)
    if isinstance(body.get("messages"), list):
        messages = [m if m["role"] in CHAT_ROLES and m["role"] != "tool" else {**m, "role": "user"}
                    for m in body["messages"]]
        body["messages"] = messages or [{"role": "user", "content": "Hello"}]
    return body


@schema.hook("flatmap_case")
def often_steered(context, case):
    """Positive cases with a JSON body are often steered (see steered()), keeping a drawn part of their fields
    (the fewer, the likelier to be accepted) besides the prompt or messages."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE or not isinstance(case.body, dict):
        return st.just(case)
    keys = sorted(case.body)
    kept = st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)).map(
        lambda keep: {k: case.body[k] for k, kept_k in zip(keys, keep) if kept_k or k in REQUIRED})
    return st.one_of(kept.map(lambda body: _with_body(case, steered(case.path, body))), st.just(case))


def _with_body(case, body: dict):
    case.body = body
    return case


@schema.parametrize()
def test_fuzz(case, keyed_server):
    case.call_and_validate(base_url=keyed_server.url, checks=CHECKS)


def test_healthy_after_fuzzing(keyed_server):
    assert keyed_server.status("/health") == 200
    status, body = fetch(keyed_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 4
    log = keyed_server.output(whole=True)
    assert "Traceback" not in log and "internal error" not in log and "failed mid-stream" not in log, log[-4000:]


# Found by fuzzing and probing; these run last, as a 500 leaves a traceback in the log checked above.
def assert_error(req: urllib.request.Request, status: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT)
    assert e.value.code == status
    assert msgspec.json.decode(e.value.read(), type=P.ErrorResponse).error.type != "internal_server_error"


def test_deeply_nested_body_is_a_400(keyed_server):
    depth = 2000
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    assert_error(urllib.request.Request(keyed_server.url + "/v1/completions", data=body, headers=AUTH), 400)


def test_api_key_not_utf8_is_a_401(keyed_server):
    headers = {"Authorization": "Bearer \xff"}  # http.client sends it as the single byte 0xff
    assert_error(urllib.request.Request(keyed_server.url + "/v1/models", headers=headers), 401)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hello", "logprobs": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "logprobs": True,
                              "top_logprobs": 3})])
def test_masked_tokens_logprobs_are_numbers(keyed_server, path, body):
    status, answer = fetch(keyed_server, path, {**body, "max_tokens": 2, "allowed_token_ids": [1, 2]})
    assert status == 200, answer
    logprobs = json.loads(answer)["choices"][0]["logprobs"]
    if "content" in logprobs:
        values = [t["logprob"] for token in logprobs["content"] for t in [token, *token["top_logprobs"]]]
    else:
        values = logprobs["token_logprobs"] + [v for top in logprobs["top_logprobs"] for v in top.values()]
    assert all(isinstance(v, float) for v in values), values
