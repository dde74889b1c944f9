"""Every server API scenario (tests/test_server_api.py, test_server_errors.py, and the sampling fields
of test_server_sampling.py) again, through the gateway in front of two replicas: the same bodies and
the same error shapes."""
import pytest

from tests.server_utils import GatewayProcess, llama_replica
from tests.test_server_api import *  # noqa: F401,F403  (collected here with the llama_server below)
from tests.test_server_errors import *  # noqa: F401,F403
from tests.test_server_sampling import (  # noqa: F401  (the one that starts its own server stays out)
    repeating_prompt, test_additive_penalties_follow_their_rule, test_min_p, test_n_gives_independent_samples,
    test_repetition_penalty, test_seed_selects_the_random_stream, test_stop_token_ids_and_min_tokens, test_top_k,
    test_top_p, test_temperature_changes_tokens_and_their_distribution)


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
