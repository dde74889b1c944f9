"""Incremental detokenization: the text each new token adds, always whole characters.

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM2, ...) decode a sequence as the UTF-8
decoding of its tokens' bytes concatenated. For them each token's bytes are tabulated once, and a
sequence's text grows through an incremental UTF-8 decoder (a lookup and a C call per token), which
holds back a character split across tokens until it is whole. The table is checked against the
tokenizer's own decode when it is built. Other tokenizers (SentencePiece style, or with space clean-up)
decode a short window of recent tokens with the tokenizer itself.
"""
from __future__ import annotations

import codecs
import random

from scalellm.engine.sequence import Sequence


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def byte_tables(tokenizer) -> tuple[list[bytes], list[bytes]] | None:
    """(bytes per token id with special tokens skipped, bytes with them kept), or None when the
    tokenizer does not decode as plain byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    decoder = _byte_decoder()
    size = len(tokenizer)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    keep = []
    for token in tokenizer.convert_ids_to_tokens(list(range(size))):
        if token is None:
            keep.append(b"")
            continue
        keep.append(b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in token))
    skip = [b"" if i in special else b for i, b in enumerate(keep)]
    if not _agrees(tokenizer, skip, keep, size):
        return None
    return skip, keep


def _agrees(tokenizer, skip: list[bytes], keep: list[bytes], size: int) -> bool:
    """Spot-check the tables against the tokenizer's own decode on random token runs."""
    rng = random.Random(0)
    for _ in range(64):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 24))]
        for table, skip_special in ((skip, True), (keep, False)):
            expected = tokenizer.decode(ids, skip_special_tokens=skip_special)
            if b"".join(table[i] for i in ids).decode("utf-8", "replace") != expected:
                return False
    return True


class Detokenizer:
    def __init__(self, tokenizer, vocab_size: int = 0):
        self.tokenizer = tokenizer
        self.tables = byte_tables(tokenizer) if tokenizer is not None else None
        if self.tables is not None:  # ids the tokenizer does not know (a padded vocabulary) decode to nothing
            pad = [b""] * max(0, vocab_size - len(self.tables[0]))
            self.tables = (self.tables[0] + pad, self.tables[1] + pad)

    def step(self, seq: Sequence, i: int) -> str:
        """Text added by the sequence's token i, the one after those already decoded; "" while a
        character is incomplete."""
        if self.tokenizer is None:
            return ""
        if self.tables is None:
            return self._window_step(seq, i + 1)
        utf8 = seq.utf8
        if utf8 is None:
            utf8 = seq.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        table = self.tables[0] if seq.params.skip_special_tokens else self.tables[1]
        return utf8.decode(table[seq.token_ids[i]])

    def flush(self, seq: Sequence) -> str:
        """At the end of a sequence: what a character left incomplete decodes to (U+FFFD), or ""."""
        if self.tables is None or seq.utf8 is None:
            return ""
        return seq.utf8.decode(b"", True)

    def _window_step(self, seq: Sequence, end: int) -> str:
        """Decodes a short window of recent tokens (up to end) and waits while it ends inside a
        multi-byte character (shown by U+FFFD), so deltas are always whole characters."""
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids[:end] if end < len(seq.token_ids) else seq.token_ids
        prefix_text = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return new_text[len(prefix_text):]
