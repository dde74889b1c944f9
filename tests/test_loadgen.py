"""tools/loadgen against the real server: counts, latencies and the server's stage breakdown."""
import json

from tools.loadgen.__main__ import main as loadgen_main


def test_closed_loop_streaming(llama_server, llama_folder, tmp_path, capsys):
    out = tmp_path / "summary.json"
    rc = loadgen_main(["--url", llama_server.url, "--concurrency", "4", "--num-requests", "12", "--input-len", "20",
                       "--output-len", "8", "--tokenizer", llama_folder, "--json", str(out), "--warmup", "1"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 12 and s["errors"] == {}
    assert s["total_output_tokens"] == 12 * 8 and s["total_prompt_tokens"] == 12 * 20
    assert 0 < s["ttft_ms"]["median"] <= s["e2e_ms"]["median"]
    assert s["tpot_ms"]["mean"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["median"]
    stages = s["stages_ms"]
    assert set(stages) >= {"parse", "tokenize", "queue", "prefill", "decode", "detokenize", "write"}
    assert stages["decode"] > 0 and all(v >= 0 for v in stages.values())
    steps = s["step_ms"]  # the engine's steps during the run: at least the 8 a request needs
    assert steps["steps"] >= 8 and 0 < steps["forward"] <= steps["served"]
    assert "TTFT" in capsys.readouterr().out


def test_open_loop_chat_non_streaming(llama_server, llama_folder, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 4}) for p in ["hi", "hello there", "yo"]))
    out = tmp_path / "summary.json"
    rc = loadgen_main(["--url", llama_server.url, "--endpoint", "chat", "--request-rate", "20", "--num-requests",
                       "6", "--prompts-file", str(prompts), "--no-stream", "--json", str(out), "--quiet"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["total_output_tokens"] == 24


def test_exact_prompts_through_the_servers_own_tokenizer(llama_server, tmp_path):
    out = tmp_path / "summary.json"
    rc = loadgen_main(["--url", llama_server.url, "--concurrency", "3", "--num-requests", "6", "--input-len", "37",
                       "--output-len", "5", "--json", str(out), "--warmup", "0", "--quiet"])  # no --tokenizer
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 6 and s["total_prompt_tokens"] == 6 * 37 and s["total_output_tokens"] == 6 * 5
    chat = tmp_path / "chat.json"
    rc = loadgen_main(["--url", llama_server.url, "--endpoint", "chat", "--num-requests", "2", "--input-len", "12",
                       "--output-len", "3", "--json", str(chat), "--warmup", "0", "--quiet"])
    assert rc == 0 and json.loads(chat.read_text())["completed"] == 2
