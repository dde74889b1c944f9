"""Embeddings (/v1/embeddings, LLM.embed): pooled final hidden states against transformers in float32,
the pooling read from a sentence-transformers layout or --pooler-config, and bad inputs refused."""
import base64
import json
import os
import random
import urllib.request

import numpy as np
import openai
import pytest
import torch

from scalellm import LLM
from scalellm.pooling_params import PoolingParams
from tests.server_utils import ServerProcess, copy_checkpoint, post_json

WORDS = ("river stone light quiet morning paper engine garden window silver market winter bridge "
         "orange candle forest signal harbor violet thunder").split()


def texts(count: int = 100, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))).capitalize() + "." for _ in range(count)]


def sentence_transformers_folder(folder: str, dest: str, mode: str, normalize: bool, **config) -> str:
    """The checkpoint laid out as sentence-transformers saves a model: modules.json, 1_Pooling."""
    copy_checkpoint(folder, dest, config=config or None)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(dest, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(dest, "1_Pooling"))
    modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
             "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": False}
    modes[mode] = True
    with open(os.path.join(dest, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, **modes}, f)
    return dest


def reference(hf, ids: list[int], kind: str, normalize: bool) -> torch.Tensor:
    with torch.no_grad():
        h = hf(torch.tensor([ids])).last_hidden_state[0].float()
    v = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[kind]
    return torch.nn.functional.normalize(v, dim=0) if normalize else v


@pytest.fixture(scope="module")
def hf_base(llama_folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(llama_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mean_folder(llama_folder, tmp_path_factory):
    return sentence_transformers_folder(llama_folder, str(tmp_path_factory.mktemp("st") / "mean"),
                                        "pooling_mode_mean_tokens", True, matryoshka_dimensions=[16, 32, 64])


@pytest.fixture(scope="module")
def mean_llm(mean_folder):
    return LLM(mean_folder, dtype="float32", block_size=16, max_num_batched_tokens=64)


@pytest.mark.parametrize("kind", [None, "LAST", "CLS"])
def test_embeddings_match_transformers(mean_llm, hf_base, kind):
    """100 texts batched through chunked prefill: cosine >= 0.9999 against transformers' pooled states
    (None: the folder's own pooling, mean and normalized)."""
    prompts = texts()
    outs = mean_llm.embed(prompts, PoolingParams(pooling_type=kind))
    tok = mean_llm.tokenizer
    cosines = []
    for text, out in zip(prompts, outs):
        ids = tok.encode(text)
        assert out.prompt_token_ids == ids
        want = reference(hf_base, ids, kind or "MEAN", True)
        got = torch.tensor(out.outputs.embedding)
        assert abs(got.norm().item() - 1) < 1e-5
        cosines.append(torch.nn.functional.cosine_similarity(got, want, dim=0).item())
    assert min(cosines) >= 0.9999, min(cosines)


def test_unnormalized_and_matryoshka(mean_llm, hf_base):
    ids = mean_llm.tokenizer.encode(texts(1, seed=5)[0])
    raw = torch.tensor(mean_llm.embed([ids], PoolingParams(normalize=False))[0].outputs.embedding)
    assert torch.allclose(raw, reference(hf_base, ids, "MEAN", False), atol=1e-4)
    short = torch.tensor(mean_llm.embed([ids], PoolingParams(dimensions=16))[0].outputs.embedding)
    assert torch.allclose(short, torch.nn.functional.normalize(raw[:16], dim=0), atol=1e-5)
    with pytest.raises(ValueError, match="dimensions must be one of"):
        mean_llm.embed([ids], PoolingParams(dimensions=20))


def test_pooling_survives_preemption(mean_folder, hf_base):
    """A cache too small for every prompt at once: prompts are preempted mid-prefill and recomputed;
    the mean is still each prompt's own."""
    llm = LLM(mean_folder, dtype="float32", block_size=16, max_num_batched_tokens=32, num_kv_blocks=8)
    prompts = [list(range(200 + 7 * i, 260 + 7 * i)) for i in range(6)]
    outs = llm.embed(prompts)
    for ids, out in zip(prompts, outs):
        want = reference(hf_base, ids, "MEAN", True)
        assert torch.nn.functional.cosine_similarity(torch.tensor(out.outputs.embedding), want, dim=0) >= 0.9999


def test_pooler_config_and_unsupported_pooling(llama_folder, tmp_path):
    from scalellm.engine.pooling import load_pooler_config

    assert load_pooler_config(llama_folder).pooling_type == "LAST"  # a decoder without a layout
    folder = sentence_transformers_folder(llama_folder, str(tmp_path / "max"), "pooling_mode_max_tokens", False)
    config = load_pooler_config(folder)
    assert config.unsupported and "pooling_mode_max_tokens" in config.unsupported
    assert load_pooler_config(folder, {"pooling_type": "cls"}).pooling_type == "CLS"
    with pytest.raises(ValueError, match="unsupported keys"):
        load_pooler_config(folder, '{"pooling": "MEAN"}')
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        load_pooler_config(folder, '{"pooling_type": "MAX"}')


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embed_server(mean_folder):
    server = ServerProcess("--model", mean_folder, "--dtype", "float32", "--served-model-name", "tiny-embed",
                           "--max-model-len", "128", "--kv-cache-memory", "32MB", "--block-size", "16",
                           "--num-threads", "1")
    yield server
    server.stop()


def test_embeddings_endpoint(embed_server, mean_llm):
    inputs = texts(5, seed=9)
    ids = [mean_llm.tokenizer.encode(t) for t in inputs]
    want = [torch.tensor(o.outputs.embedding) for o in mean_llm.embed(inputs)]
    r = post_json(embed_server.url, "/v1/embeddings", {"model": "tiny-embed", "input": inputs})
    assert r["object"] == "list" and r["model"] == "tiny-embed"
    assert [d["index"] for d in r["data"]] == list(range(5)) and r["data"][0]["object"] == "embedding"
    for d, w in zip(r["data"], want):
        assert torch.allclose(torch.tensor(d["embedding"]), w, atol=1e-5)
    assert r["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    one = post_json(embed_server.url, "/v1/embeddings", {"input": ids[0]})  # a token array
    assert torch.allclose(torch.tensor(one["data"][0]["embedding"]), want[0], atol=1e-5)
    many = post_json(embed_server.url, "/v1/embeddings", {"input": ids[:2], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(many["data"][1]["embedding"]), dtype="<f4")
    assert torch.allclose(torch.from_numpy(decoded.copy()), want[1], atol=1e-5)
    short = post_json(embed_server.url, "/v1/embeddings", {"input": inputs[0], "dimensions": 32})
    assert len(short["data"][0]["embedding"]) == 32


def test_openai_client_embeddings(embed_server, mean_llm):
    """The openai package asks for base64 by default and decodes it."""
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    r = client.embeddings.create(model="tiny-embed", input=["a quiet river", "silver bridge"])
    want = mean_llm.embed(["a quiet river", "silver bridge"])
    for d, w in zip(r.data, want):
        assert np.allclose(d.embedding, w.outputs.embedding, atol=1e-5)


def test_truncate_prompt_tokens(embed_server, mean_llm):
    ids = list(range(300, 500))  # longer than the 128-token context
    r = post_json(embed_server.url, "/v1/embeddings", {"input": ids, "truncate_prompt_tokens": 50})
    want = mean_llm.embed([ids[-50:]])[0].outputs.embedding
    assert np.allclose(r["data"][0]["embedding"], want, atol=1e-5) and r["usage"]["prompt_tokens"] == 50


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"), ({"input": ["a", ""]}, "input"),
    ({"input": 5}, None), ({"input": {"text": "a"}}, None), ({"input": ["a", [1, 2]]}, None),
    ({"input": [1, "a"]}, "input"), ({"input": [1.5]}, "input"), ({"input": [10 ** 9]}, "input"),
    ({"input": list(range(300, 500))}, "input"), ({"input": "word " * 2000}, "input"),
    ({"input": "a", "dimensions": 20}, "dimensions"), ({"input": "a", "encoding_format": "int8"}, None),
    ({"input": "a", "model": "other"}, "model"), ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"input": "a", "unknown_field": 1}, None)])
def test_bad_inputs_are_400s(embed_server, body, param):
    req = urllib.request.Request(embed_server.url + "/v1/embeddings", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    error = json.loads(e.value.read())["error"]
    assert e.value.code == (404 if param == "model" else 400), error
    if param is not None:
        assert error["param"] == param, error
    assert embed_server.status() == 200


def test_dimensions_without_matryoshka(llama_folder):
    llm = LLM(llama_folder, dtype="float32", block_size=16)
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        llm.embed(["a"], PoolingParams(dimensions=32))
    assert len(llm.embed(["a"], PoolingParams(dimensions=64))[0].outputs.embedding) == 64
