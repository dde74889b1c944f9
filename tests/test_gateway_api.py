"""Every server API scenario (tests/test_server_api.py, test_server_errors.py) again, through the
gateway in front of two replicas: the same bodies and the same error shapes."""
import pytest

from tests.server_utils import GatewayProcess, llama_replica
from tests.test_server_api import *  # noqa: F401,F403  (collected here with the llama_server below)
from tests.test_server_errors import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def llama_server(llama_folder):
    """Named as the server tests expect: the gateway, in front of two replicas."""
    replicas = [llama_replica(llama_folder) for _ in range(2)]
    gateway = GatewayProcess(*[a for r in replicas for a in ("--replica", r.url)], "--policy", "round_robin")
    try:
        yield gateway
    finally:
        gateway.stop()
        for r in replicas:
            r.stop()
