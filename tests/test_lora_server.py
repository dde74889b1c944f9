"""LoRA over HTTP: adapters chosen by a request's model, listed in /v1/models with their parent, loaded
and unloaded at runtime behind the API key (running requests finish first), the lora_requests_info
metric, and a gateway routing adapter names as replicas list them."""
import json
import threading
import time
import urllib.request

import openai
import pytest

from tests.checkpoints import build_lora_adapter, hf_lora_greedy
from tests.server_utils import GatewayProcess, ServerProcess

KEY = {"Authorization": "Bearer secret"}
PROMPT = list(range(5, 25))


@pytest.fixture(scope="module")
def adapters(llama_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-loras")
    return [build_lora_adapter(llama_folder, str(root / f"a{i}"), seed=10 + i, rank=8) for i in range(3)]


@pytest.fixture(scope="module")
def lora_server(llama_folder, adapters):
    server = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                           "--max-model-len", "512", "--kv-cache-memory", "32MB", "--block-size", "16",
                           "--num-threads", "1", "--api-key", "secret", "--enable-lora", "--max-loras", "2",
                           "--lora-modules", f"a0={adapters[0]}")
    yield server
    server.stop()


def post(server, path: str, body: dict, headers=KEY) -> tuple[int, bytes]:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def greedy(server, model: str, max_tokens: int = 8) -> dict:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    return {"model": r.model, "tokens": r.choices[0].token_ids}


def test_models_and_requests_by_adapter(lora_server, llama_folder, adapters):
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="secret", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-llama", "a0"}
    assert cards["a0"].parent == "tiny-llama" and cards["a0"].root == adapters[0]
    out = greedy(lora_server, "a0")
    assert out == {"model": "a0", "tokens": hf_lora_greedy(llama_folder, adapters[0], [PROMPT], 8)[0]}
    assert greedy(lora_server, "tiny-llama")["tokens"] != out["tokens"]


def test_runtime_load_and_unload(lora_server, llama_folder, adapters):
    body = {"lora_name": "a1", "lora_path": adapters[1]}
    assert post(lora_server, "/v1/load_lora_adapter", body, headers={})[0] == 401
    status, text = post(lora_server, "/v1/load_lora_adapter", body)
    assert status == 200 and b"a1" in text
    assert post(lora_server, "/v1/load_lora_adapter", body)[0] == 400  # already loaded
    status, text = post(lora_server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"})
    assert status == 400 and b"adapter_config.json" in text
    assert greedy(lora_server, "a1")["tokens"] == hf_lora_greedy(llama_folder, adapters[1], [PROMPT], 8)[0]

    # unloading while a request runs: it finishes, new ones are refused at once
    streamed: list = []

    def long_request():
        client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="secret", max_retries=0)
        stream = client.completions.create(model="a1", prompt=PROMPT, max_tokens=300, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed.extend(chunk.choices[0] for chunk in stream if chunk.choices)
    runner = threading.Thread(target=long_request)
    runner.start()
    deadline = time.monotonic() + 30
    while not streamed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "a1"})[0] == 200
    status, text = post(lora_server, "/v1/completions", {"model": "a1", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and json.loads(text)["error"]["code"] == "model_not_found"
    assert post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "a1"})[0] == 404
    runner.join(120)
    assert streamed[-1].finish_reason == "length"
    assert "a1" not in {m["id"] for m in json.loads(urllib.request.urlopen(urllib.request.Request(
        lora_server.url + "/v1/models", headers=KEY), timeout=10).read())["data"]}


def test_lora_metric(lora_server):
    metrics = urllib.request.urlopen(
        urllib.request.Request(lora_server.url + "/metrics", headers=KEY), timeout=10).read().decode()
    line = next(x for x in metrics.splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="2"' in line and "running_lora_adapters=" in line and "waiting_lora_adapters=" in line


def test_gateway_routes_adapters(llama_folder, adapters):
    replica = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                            "--max-model-len", "512", "--kv-cache-memory", "32MB", "--block-size", "16",
                            "--num-threads", "1", "--enable-lora")
    gateway = GatewayProcess("--replica", replica.url)
    try:
        assert post(gateway, "/v1/completions", {"model": "a2", "prompt": "hi", "max_tokens": 2}, {})[0] == 404
        assert post(replica, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": adapters[2]}, {})[0] == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # visible on the gateway's next health check
            with urllib.request.urlopen(gateway.url + "/v1/models", timeout=10) as r:
                if "a2" in {m["id"] for m in json.loads(r.read())["data"]}:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the gateway never listed the adapter loaded at runtime")
        via_gateway, direct = greedy(gateway, "a2"), greedy(replica, "a2")
        assert via_gateway == direct
        status, body = post(gateway, "/v1/embeddings", {"model": "a2", "input": "hello"}, {})
        assert status == 200 and json.loads(body)["model"] == "a2"
    finally:
        gateway.stop()
        replica.stop()


def test_bundled_model_with_an_adapter(tmp_path):
    """The bundled SmolLM2 served unquantized in float32 with a random PEFT adapter: greedy tokens
    identical to transformers + peft on the same GGUF, for chat-length prompts."""
    from scalellm.model.loader import default_model_path
    from tests.checkpoints import bundled_tokenizer

    gguf = default_model_path()
    adapter = build_lora_adapter(gguf, str(tmp_path / "smollm2-lora"), seed=3, rank=8, scale=0.5)
    tok = bundled_tokenizer()
    prompts = [tok.encode(t) for t in ("The capital of France is", "Once upon a time, in a small village,")]
    want = hf_lora_greedy(gguf, adapter, prompts, 12)
    server = ServerProcess("--quantization", "none", "--dtype", "float32", "--max-model-len", "256",
                           "--kv-cache-memory", "64MB", "--enable-lora", "--lora-modules", f"tuned={adapter}")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for ids, expected in zip(prompts, want):
            r = client.completions.create(model="tuned", prompt=ids, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            assert r.choices[0].token_ids == expected
            base = client.completions.create(model=client.models.list().data[0].id, prompt=ids, max_tokens=12,
                                             temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
            assert base.choices[0].token_ids != expected  # the adapter matters
    finally:
        server.stop()
