"""The README's commands and examples, run as written: `tools/serve.sh` (installing what is missing,
then serving the bundled model), the Quick start's curl and Python examples, and the load generator."""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.server_utils import ROOT, free_port

README = os.path.join(ROOT, "README.md")


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def port_8000_free() -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def readme_server():
    """`tools/serve.sh` as the README's first block has it (with --port only if 8000 is taken here)."""
    text = open(README).read()
    serve = blocks(text, "bash")[0].splitlines()[0].split("#")[0].strip()
    assert serve == "tools/serve.sh"
    port = 8000 if port_8000_free() else free_port()
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"scalellm-readme-{port}.log"), "w")
    cmd = serve if port == 8000 else f"{serve} --port {port}"
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a fresh clone installs first
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError(f"tools/serve.sh did not become healthy: {open(log.name).read()[-3000:]}")
    yield text, port
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    log.close()


def run(text: str, port: int, interpreter: list[str]) -> subprocess.CompletedProcess:
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    venv = os.path.join(ROOT, ".venv")
    env = {**os.environ, "VIRTUAL_ENV": venv, "PATH": os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"]}
    return subprocess.run([*interpreter, text], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_quick_start_examples(readme_server):
    text, port = readme_server
    quick = section(text, "Quick start")
    (curl,) = blocks(quick, "bash")
    out = run(curl, port, ["bash", "-c"])
    assert out.returncode == 0 and "Paris" in out.stdout, out
    streamed, offline = blocks(quick, "python")
    out = run(streamed, port, [sys.executable, "-c"])  # the environment's python, as after `source .venv/bin/activate`
    assert out.returncode == 0 and len(out.stdout.split()) > 3, out
    out = run(offline, port, [sys.executable, "-c"])
    assert out.returncode == 0 and "Paris" in out.stdout, out


def test_load_generation_command(readme_server):
    text, port = readme_server
    (command,) = blocks(section(text, "Load generation"), "bash")
    out = run(command, port, ["bash", "-c"])
    assert out.returncode == 0 and "TTFT" in out.stdout, out
    assert re.search(r"requests: (\d+)/\1 ok", out.stdout), out.stdout
