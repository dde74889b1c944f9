"""Every server API scenario (tests/test_server_api.py, test_server_errors.py, the sampling fields
of test_server_sampling.py, and structured outputs and forced tool calls of test_structured_api.py) again, through the gateway in front of two replicas: the same bodies and
the same error shapes."""
import pytest

from tests.server_utils import GatewayProcess, llama_replica
from tests.test_server_api import *  # noqa: F401,F403  (collected here with the llama_server below)
from tests.test_server_errors import *  # noqa: F401,F403
from tests.test_structured_api import (  # noqa: F401  (/metrics is the gateway's own: its counters stay out)
    test_bad_constraints, test_completion_refusals, test_completions_constrained_streamed_and_n,
    test_forced_tool_call_whole_and_streamed, test_json_object_regex_choice_grammar, test_json_schema_spellings,
    test_length_cut_and_logit_fields)
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
