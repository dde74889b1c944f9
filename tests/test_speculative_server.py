"""The server with --speculative-config: streamed and whole answers equal the unspeculated server's
(several tokens per delta when drafts are accepted), the vllm:spec_decode_* counters on /metrics, and a
bad config refused at start."""
import subprocess
import sys

import pytest

from tests.server_utils import ServerProcess, scrape
from tests.test_speculative import repetitive_prompts
from tests.test_token_ids import post, stream, streamed_ids

NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
ARGS = ("--dtype", "float32", "--served-model-name", "tiny-llama", "--max-model-len", "512",
        "--kv-cache-memory", "64MB", "--block-size", "16")


@pytest.fixture(scope="module")
def spec_server(llama_folder):
    server = ServerProcess("--model", llama_folder, *ARGS, "--speculative-config", NGRAM)
    yield server
    server.stop()


def test_answers_equal_the_unspeculated_servers(spec_server, llama_server):
    prompts = repetitive_prompts(1)
    widest = 0  # most tokens in one streamed delta
    for prompt in prompts:
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "logprobs": 1}
        expected = post(llama_server, "/v1/completions", body)["choices"][0]
        got = post(spec_server, "/v1/completions", body)["choices"][0]
        assert got["token_ids"] == expected["token_ids"] and got["text"] == expected["text"]
        assert got["logprobs"]["tokens"] == expected["logprobs"]["tokens"]
        chunks = stream(spec_server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        assert streamed_ids(chunks, 1)[0] == expected["token_ids"]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected["text"]
        assert chunks[-1]["usage"]["completion_tokens"] == 24
        widest = max([widest] + [len(c["choices"][0].get("token_ids", [])) for c in chunks if c["choices"]])
    assert widest > 1
    m = scrape(spec_server.url)
    drafts = m["vllm:spec_decode_num_drafts_total"]
    accepted = m["vllm:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and 0 < accepted < m["vllm:spec_decode_num_draft_tokens_total"]
    per_pos = [m[f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(3)]
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[1] >= per_pos[2]


def test_bad_config_refused_at_start(llama_folder):
    for config, why in (("{", "not valid JSON"), ('{"method": "eagle", "num_speculative_tokens": 2}', "not supported")):
        proc = subprocess.run([sys.executable, "-m", "scalellm.server", "--model", llama_folder,
                               "--speculative-config", config], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and why in proc.stderr
