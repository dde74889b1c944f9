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

    def echo_logprobs(self, prompt_ids: list[int], prompt: list[Logprob | None], k: int, generated: list[Logprob],
                      echo_len: int) -> P.CompletionLogprobs:
        """OpenAI's echo with logprobs: the prompt's tokens first (the first token's logprob and top ones
        null; each other's top ones with the token itself, as vLLM), then the generated tokens'."""
        tokens, values, tops, offsets = [], [], [], []
        offset = 0
        for token_id, lp in zip(prompt_ids, prompt):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if lp is None:  # the first token: nothing before it to score it
                values.append(None)
                tops.append(None)
                continue
            values.append(_finite(lp.logprob))
            top = {self.token_text(t): _finite(v) for t, v in lp.top[:k]}
            top.setdefault(text, _finite(lp.logprob))
            tops.append(top)
        rest = self.completion_logprobs(generated, echo_len)
        return P.CompletionLogprobs(tokens + rest.tokens, values + rest.token_logprobs, tops + rest.top_logprobs,
                                    offsets + rest.text_offset)

    def prompt_logprobs(self, prompt: list[Logprob | None], k: int) -> P.PromptLogprobs:
        """vLLM's prompt_logprobs: per position None (the first) or {token id: entry} for the token and
        the top k."""
        out: P.PromptLogprobs = []
        for lp in prompt:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): P.PromptLogprob(_finite(lp.logprob), lp.rank, self.token_text(lp.token_id))}
            for rank, (t, v) in enumerate(lp.top[:k], 1):
                entry.setdefault(str(t), P.PromptLogprob(_finite(v), rank, self.token_text(t)))
            out.append(entry)
        return out

    def chat_logprobs(self, logprobs: list[Logprob]) -> P.ChatLogprobs:
        content = []
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            top = [P.TopLogprob(self.token_text(t), _finite(v), list(self.token_text(t).encode()))
                   for t, v in lp.top]
            content.append(P.TokenLogprob(text, _finite(lp.logprob), list(text.encode()), top))
        return P.ChatLogprobs(content)
