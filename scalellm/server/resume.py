"""Streams that can be continued elsewhere: a request's `resume` field, and the token events a router
asks for to build one.

With the request header `x-stream-token-ids: 1`, each event of a stream is preceded by an SSE id line,
`id: <choice index>:<token ids, comma-separated>[:<finish reason>]`, naming the tokens that event
carries (an event the stream would leave out, such as text a tool-call parser holds back, is sent
as that line alone). A router keeps them, takes them out of what its client sees, and, when the
server dies mid-stream, sends the request again to another server with `resume`: the stream's id
and creation time, and each choice's tokens so far (which the client's text follows from). That
server replays them (engine/continuation.py) and streams on from where the client was.
"""
from __future__ import annotations

from scalellm.server import protocol as P
from scalellm.server.errors import APIError

TOKEN_IDS_HEADER = "x-stream-token-ids"


def continuation(req, n: int, num_prompts: int) -> list[list[int] | None] | None:
    """The engine's continuation (SamplingParams.continuation) for a request's `resume`, or None."""
    resume: P.Resume | None = req.resume
    if resume is None:
        return None
    if not req.stream:
        raise APIError(400, "resume continues a stream: it needs stream: true", param="resume")
    if num_prompts != 1:
        raise APIError(400, "resume continues a stream of one prompt", param="resume")
    outputs: list[list[int] | None] = [[] for _ in range(n)]
    seen = set()
    for c in resume.choices:
        if not 0 <= c.index < n or c.index in seen:
            raise APIError(400, f"resume.choices: index {c.index} is not one of the request's {n} choices, "
                                "or is given twice", param="resume")
        seen.add(c.index)
        outputs[c.index] = None if c.finished else c.token_ids
    return outputs


def finished_tokens(req) -> int:
    """Tokens of the choices that finished before the cut: they count in the stream's usage."""
    return sum(len(c.token_ids) for c in req.resume.choices if c.finished) if req.resume is not None else 0


def event_id(index: int, token_ids: list[int], finish_reason: str | None) -> bytes:
    ids = ",".join(map(str, token_ids))
    if finish_reason is None:
        return f"id: {index}:{ids}\n".encode()
    return f"id: {index}:{ids}:{finish_reason}\n".encode()
