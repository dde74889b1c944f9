"""The gateway's stream path in pieces: the bare HTTP/1.1 answer parser (any split of the bytes), and the
relay that strips token events, forwards whole events only and knows what a resume needs."""
import asyncio
import json
import random

import pytest

from prometheus_client import CollectorRegistry

from scalellm.gateway.connection import ReplicaConnection
from scalellm.gateway.metrics import LoopHistogram
from scalellm.gateway.relay import StreamRelay


class Transport:
    """What the relay writes to the client (HTTP/1.1 chunks), kept."""

    def __init__(self):
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.closed = True

    def events(self) -> bytes:
        """The body, de-chunked."""
        out, buf = bytearray(), bytes(self.data)
        while buf:
            size_end = buf.index(b"\r\n")
            size = int(buf[:size_end], 16)
            out += buf[size_end + 2:size_end + 2 + size]
            buf = buf[size_end + 2 + size + 2:]
        return bytes(out)


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nx-stream-token-ids: 1\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_any_split_of_a_chunked_or_sized_answer_gives_the_same_body():
    async def main():
        rng = random.Random(0)
        body = [b"id: 0:1\ndata: {\"a\": 1}\n\n", b"data: x\r\n\r\n", b"id: 0:2,3:stop\n\n" * 3]
        for trial in range(200):
            conn = ReplicaConnection()
            conn.connection_made(Transport())
            got = []
            conn.listen(got.append)
            sized = trial % 3 == 0
            raw = (b"HTTP/1.1 400 Bad\r\nContent-Length: 11\r\n\r\n{\"e\": true}" if sized else HEAD + chunked(*body))
            for piece in splits(raw, rng):
                conn.data_received(piece)
            status, headers = conn.head.result()
            assert conn.ended.done() and conn.complete and conn.keep_alive
            assert (status, b"".join(got)) == ((400, b'{"e": true}') if sized else (200, b"".join(body)))
            assert sized or headers["x-stream-token-ids"] == "1"
    asyncio.run(main())


def test_a_connection_lost_mid_answer_fails_its_futures():
    async def main():
        conn = ReplicaConnection()
        conn.connection_made(Transport())
        conn.listen(lambda piece: None)
        conn.data_received(HEAD + b"5\r\nhel")
        conn.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(ConnectionError):
            await conn.ended
        assert not conn.complete
    asyncio.run(main())


def events(*pairs) -> bytes:
    out = b""
    for ident, data in pairs:
        out += (b"id: " + ident + b"\n" if ident is not None else b"") + (b"data: " + data + b"\n" if data else b"")
        out += b"\n"
    return out


def relay_over(stream: bytes, rng: random.Random, n: int = 2, include_usage: bool = True):
    async def main():
        client = Transport()
        relay = StreamRelay(client, n, include_usage, 0.0, chat=True)
        conn = ReplicaConnection()
        conn.connection_made(Transport())
        histogram = LoopHistogram("h", "h", ["replica"], [0.01, 0.1, 1.0], CollectorRegistry())
        relay.attach(conn, True, histogram.labels("ttft"), histogram.labels("itl"))
        relay.direct = True
        for piece in splits(stream, rng):
            relay.feed(piece)
        tail = relay.take_pending()  # the last events, which the handler writes with the body's end
        if tail:
            client.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        return relay, client
    return asyncio.run(main())


FIRST = b'{"id":"chatcmpl-1","created":7,"choices":[{"index":0,"delta":{"role":"assistant"}}]}'


def test_token_events_are_stripped_kept_and_make_the_resume():
    stream = events((None, FIRST), (b"0:5", b'{"c":0}'), (b"1:6,7", b'{"c":1}'), (b"0:8", None),
                    (b"0:9:stop", b'{"c":2}'))
    for seed in range(50):
        relay, client = relay_over(stream, random.Random(seed))
        sent = client.events()
        assert b"id: " not in sent and sent.count(b"\n\n") == 4  # the id-only event sends nothing
        assert sent.startswith(b"data: " + FIRST)
        body = json.loads(relay.resume_body(b'{"model": "m", "n": 2}'))
        assert body["model"] == "m" and body["resume"]["id"] == "chatcmpl-1" and body["resume"]["created"] == 7
        assert sorted((c["index"], c["token_ids"], c["finished"]) for c in body["resume"]["choices"]) == \
            [(0, [5, 8, 9], True), (1, [6, 7], False)]
        assert relay.what_is_left() == "resume"


def test_after_every_choice_and_the_usage_only_done_is_missing():
    stream = events((None, FIRST), (b"0:5:length", b'{"c":0}'), (b"1:6:stop", b'{"c":1}'), (None, b'{"usage":{}}'))
    relay, _ = relay_over(stream, random.Random(1))
    assert relay.what_is_left() == "done_but_marker"
    relay, _ = relay_over(stream + b"data: [DONE]\n\n", random.Random(1))
    assert relay.ended and relay.what_is_left() == "done"


def test_an_engine_death_event_is_a_cut_and_another_error_ends_the_stream():
    dead = events((None, FIRST), (b"0:5", b'{"c":0}'), (None, b'{"error":{"code":"engine_dead"}}'))
    relay, client = relay_over(dead, random.Random(2))
    assert b"engine_dead" not in client.events() and relay.cut and relay.what_is_left() == "resume"
    failed = events((None, FIRST), (b"0:5", b'{"c":0}'), (None, b'{"error":{"code":"engine_error"}}'))
    relay, client = relay_over(failed, random.Random(2))
    assert client.events().endswith(b'{"error":{"code":"engine_error"}}\n\n') and relay.what_is_left() == "done"


def test_a_part_event_of_a_dead_replica_never_reaches_the_client():
    relay, client = relay_over(events((None, FIRST), (b"0:5", b'{"c":0}')) + b"id: 0:6\ndata: {\"c\"", random.Random(3))
    assert client.events().count(b"\n\n") == 2
    body = json.loads(relay.resume_body(b'{"n": 2}'))
    assert body["resume"]["choices"] == [{"index": 0, "token_ids": [5], "finished": False}]


def test_a_running_stream_fed_one_event_per_read_keeps_every_token():
    tokens = list(range(100, 140))
    stream = [events((None, FIRST))] + [events((b"0:%d" % t, b'{"t":%d}' % t)) for t in tokens]
    stream.insert(20, events((b"0:", b'{"t":null}')))  # an event that carries no token

    async def main():
        client = Transport()
        relay = StreamRelay(client, 1, False, 0.0, chat=True)
        conn = ReplicaConnection()
        conn.connection_made(Transport())
        histogram = LoopHistogram("h", "h", ["replica"], [0.01, 0.1, 1.0], CollectorRegistry())
        relay.attach(conn, True, histogram.labels("ttft"), histogram.labels("itl"))
        relay.direct = True
        for piece in stream:
            relay.feed(piece)
        return relay, client, histogram
    relay, client, histogram = asyncio.run(main())
    sent = [e for e in client.events().split(b"\n\n") if e]
    expected = [b"data: " + FIRST] + [b'data: {"t":%d}' % t for t in tokens]
    expected.insert(20, b'data: {"t":null}')
    assert sent == expected
    body = json.loads(relay.resume_body(b'{"n": 1}'))
    assert body["resume"]["choices"] == [{"index": 0, "token_ids": tokens, "finished": False}]
    assert sum(histogram.series[("itl",)].counts) == len(tokens)  # a gap per event after the first


def test_the_gateway_process_loads_no_engine():
    """The gateway imports no torch, transformers or numpy: a lighter process whose collector's full
    passes (which pause every stream) walk a small heap."""
    import subprocess
    import sys

    code = ("import sys, scalellm.gateway.__main__, scalellm.gateway.proxy, scalellm.gateway.launcher; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'llguidance', 'scalellm.engine') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
