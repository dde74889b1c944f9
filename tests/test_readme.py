"""The README's and docs' commands and examples, run as written: `tools/serve.sh` (installing what is
missing, then serving the bundled model), the Quick start's curl and Python examples, the load
generator, and every other shell block in README.md and docs/ against that server, unless the line
before it says `<!-- no-run: why -->`."""
import glob
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
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
NO_RUN = re.compile(r"<!-- no-run: (.+?) -->\n```bash\n", re.S)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def shell_blocks() -> list[tuple[str, int, str, str | None]]:
    """(file, index, block, the no-run reason or None) for every bash block in README.md and docs/."""
    out = []
    for path in [README, *DOCS]:
        text = open(path).read()
        for i, m in enumerate(re.finditer(r"(<!-- no-run: (.*?) -->\n)?```bash\n(.*?)```", text, re.S)):
            out.append((os.path.relpath(path, ROOT), i, m.group(3), m.group(2)))
    return out


# run by their own tests below (the two commands: the fixture serves with the first, CI runs the second)
SPECIFIC = {("README.md", 0), ("README.md", 1), ("docs/serving.md", 1)}


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
    curl = blocks(quick, "bash")[0]
    out = run(curl, port, ["bash", "-c"])
    assert out.returncode == 0 and "Paris" in out.stdout, out
    streamed, offline = blocks(quick, "python")
    out = run(streamed, port, [sys.executable, "-c"])  # the environment's python, as after `source .venv/bin/activate`
    assert out.returncode == 0 and len(out.stdout.split()) > 3, out
    out = run(offline, port, [sys.executable, "-c"])
    assert out.returncode == 0 and "Paris" in out.stdout, out


def test_load_generation_command(readme_server):
    _, port = readme_server
    (command,) = blocks(section(open(os.path.join(ROOT, "docs", "serving.md")).read(), "Load generation"), "bash")
    out = run(command, port, ["bash", "-c"])
    assert out.returncode == 0 and "TTFT" in out.stdout, out
    assert re.search(r"requests: (\d+)/\1 ok", out.stdout), out.stdout



def test_every_shell_block_runs_or_says_why_not():
    found = shell_blocks()
    assert len(found) >= 10 and {f for f, *_ in found} >= {"README.md", "docs/serving.md", "docs/structured-outputs.md"}
    assert all(why is None or len(why.strip()) > 10 for *_, why in found), "a no-run marker needs its reason"
    assert {(f, i) for f, i, *_ in found} >= SPECIFIC


@pytest.mark.parametrize("where, index, block", [(f, i, b) for f, i, b, why in shell_blocks()
                                                 if why is None and (f, i) not in SPECIFIC],
                         ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_doc_shell_block(readme_server, where, index, block):
    _, port = readme_server
    block = block.replace("localhost:8000", "127.0.0.1:8000")
    out = run(block, port, ["bash", "-e", "-o", "pipefail", "-c"])
    assert out.returncode == 0, out
    assert '{"error"' not in out.stdout.replace(" ", ""), out.stdout[-2000:]
