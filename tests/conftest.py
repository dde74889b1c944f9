import pytest

pytest.register_assert_rewrite("tests.cuda_kernel_checks")  # its checks' failures say what differed

from tests.checkpoints import ARCHS, build_checkpoint


@pytest.fixture(scope="session", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    # The llama checkpoint is sharded to exercise model.safetensors.index.json.
    shard = "2MB" if request.param == "llama" else None
    return request.param, build_checkpoint(request.param, str(folder), max_shard_size=shard)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("ckpt-llama-plain")))


@pytest.fixture(scope="session")
def llama_llm(llama_folder):
    from scalellm import LLM

    return LLM(llama_folder, dtype="float32", block_size=16)  # small blocks: tests reason about block sharing


@pytest.fixture(scope="session")
def llama_server(llama_folder):
    from tests.server_utils import ServerProcess

    server = ServerProcess("--model", llama_folder, "--dtype", "float32", "--served-model-name", "tiny-llama",
                           "--max-model-len", "512", "--kv-cache-memory", "64MB", "--block-size", "16")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_hf(llama_folder):
    """transformers' own model on the same checkpoint as llama_llm, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llama_long_folder(llama_folder, tmp_path_factory):
    """The plain test llama with a 64k context: a request there can outlast any wait in a test."""
    from tests.server_utils import copy_checkpoint

    return copy_checkpoint(llama_folder, str(tmp_path_factory.mktemp("ckpt-llama-long") / "llama"),
                           config={"max_position_embeddings": 65536})
