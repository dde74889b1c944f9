"""Token text for logprobs in OpenAI's two shapes (completions and chat)."""
from __future__ import annotations

from scalellm.outputs import Logprob
from scalellm.server import protocol as P


# what OpenAI answers for a token that could not be sampled (-inf is not JSON: msgspec would write null)
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text

    def completion_logprobs(self, logprobs: list[Logprob], offset: int) -> P.CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            values.append(_finite(lp.logprob))
            tops.append({self.token_text(t): _finite(v) for t, v in lp.top})
            offsets.append(offset)
            offset += len(text)
        return P.CompletionLogprobs(tokens, values, tops, offsets)

    def chat_logprobs(self, logprobs: list[Logprob]) -> P.ChatLogprobs:
        content = []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            top = [P.TopLogprob(self.token_text(t), _finite(v), list(self.token_text(t).encode()))
                   for t, v in lp.top]
            content.append(P.TokenLogprob(text, _finite(lp.logprob), list(text.encode()), top))
        return P.ChatLogprobs(content)
