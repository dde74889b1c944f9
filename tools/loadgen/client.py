"""One request against an OpenAI-compatible server, timed from the client's side."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
import msgspec


@dataclass
class Result:
    ok: bool
    status: int | None = None
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    text: str | None = None  # the reply, when send() was asked to keep it
    finish_reason: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def request_body(endpoint: str, model: str | None, prompt, max_tokens: int, stream: bool, ignore_eos: bool,
                 extra: dict | None = None) -> dict:
    """`extra`: more fields (response_format, ...), merged last so they may also override the defaults."""
    body: dict = {"max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if model:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True
    if stream:
        body["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if extra:
        body.update(extra)
    return body


def _text_of(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("delta") or choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


async def send(session: aiohttp.ClientSession, url: str, body: dict, chat: bool, headers: dict,
               keep_text: bool = False) -> Result:
    """`keep_text`: keep the reply's text in result.text (the first choice's)."""
    result = Result(ok=False, start=time.perf_counter())
    parts: list[str] | None = [] if keep_text else None
    start = result.start
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = (await resp.text())[:200]
                return result
            if not body["stream"]:
                data = msgspec.json.decode(await resp.read())
                now = time.perf_counter()
                result.ttft = result.e2e = now - start
                usage = data.get("usage") or {}
                result.output_tokens = usage.get("completion_tokens", 0)
                result.prompt_tokens = usage.get("prompt_tokens", 0)
                choices = data.get("choices") or ({},)
                result.finish_reason = choices[0].get("finish_reason")
                if keep_text:
                    result.text = _text_of(choices[0], chat)
                result.ok = True
                return result
            last = None
            chunks_with_text = 0
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                data = msgspec.json.decode(payload)
                now = time.perf_counter()
                usage = data.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                for choice in data.get("choices") or ():
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                    if text := _text_of(choice, chat):
                        if parts is not None and choice.get("index", 0) == 0:
                            parts.append(text)
                        chunks_with_text += 1
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itls.append(now - last)
                        last = now
            result.e2e = time.perf_counter() - start
            if parts is not None:
                result.text = "".join(parts)
            if not result.output_tokens:
                result.output_tokens = chunks_with_text
            result.ok = result.ttft is not None
            if not result.ok:
                result.error = "no tokens streamed"
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result
