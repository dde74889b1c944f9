"""The HTTP floor: a bare aiohttp server that streams canned completion chunks as fast as it can.

    python bench/bare_sse_server.py --port 8100 [--itl-ms 10]

It does what every server must at the least (read and parse the body, write max_tokens SSE frames,
a usage frame and [DONE]) and nothing else, so loadgen against it measures the HTTP layer alone.
With --itl-ms it paces the frames like a decoding model (the fake replica of bench/gateway.py).
"""
from __future__ import annotations

import argparse
import asyncio

import msgspec
from aiohttp import web


class Body(msgspec.Struct):
    max_tokens: int = 16
    stream: bool = False


DECODER = msgspec.json.Decoder(Body)
CHUNK = (b'data: {"id":"cmpl-bare","object":"text_completion","created":0,"model":"bare","choices":'
         b'[{"index":0,"text":" tok","logprobs":null,"finish_reason":null}]}\n\n')


async def completions(request: web.Request) -> web.StreamResponse:
    body = DECODER.decode(await request.read())
    usage = {"prompt_tokens": 0, "completion_tokens": body.max_tokens, "total_tokens": body.max_tokens}
    if not body.stream:
        return web.json_response({"id": "cmpl-bare", "object": "text_completion", "model": "bare",
                                  "choices": [{"index": 0, "text": " tok" * body.max_tokens,
                                               "finish_reason": "length"}], "usage": usage})
    # asked for token events (a resuming gateway): each frame names its token, as a scalellm server does
    token_events = request.headers.get("x-stream-token-ids") == "1"
    headers = {"Content-Type": "text/event-stream"}
    if token_events:
        headers["x-stream-token-ids"] = "1"
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    pause = request.app["itl"]
    for i in range(body.max_tokens):
        if token_events:
            last = b":length" if i == body.max_tokens - 1 else b""
            await resp.write(b"id: 0:%d%s\n%s" % (100 + i, last, CHUNK))
        else:
            await resp.write(CHUNK)
        if pause:
            await asyncio.sleep(pause)
        elif request.app["yield"]:  # let the other streams and new requests in between frames, as an engine does
            await asyncio.sleep(0)
    final = {"id": "cmpl-bare", "object": "text_completion", "model": "bare", "choices": [], "usage": usage}
    await resp.write(b"data: " + msgspec.json.encode(final) + b"\n\ndata: [DONE]\n\n")
    return resp


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bare", "object": "model", "owned_by": "bench"}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--itl-ms", type=float, default=0.0, help="pause between streamed frames")
    ap.add_argument("--yield-frames", action="store_true",
                    help="without a pause, still give the event loop a turn between frames (by default one stream "
                         "writes all its frames before any other request runs)")
    args = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    app = web.Application()
    app["itl"] = args.itl_ms / 1000.0
    app["yield"] = args.yield_frames
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
