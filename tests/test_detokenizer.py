"""Incremental detokenization: deltas are valid text and add up to the full decode."""
from scalellm.engine.detokenizer import Detokenizer
from scalellm.engine.output_processor import append_token
from scalellm.engine.sequence import Sequence
from scalellm.sampling_params import SamplingParams
from tests.checkpoints import bundled_tokenizer

TEXTS = ["Grüße aus Köln — naïve café", "日本語のテキストと絵文字 🎉🚀👩‍👩‍👧", "mixed: ∑∫√ and ascii"]


def test_multibyte_characters_are_never_split():
    tok = bundled_tokenizer()
    detok = Detokenizer(tok)
    assert detok.tables is not None  # the byte-table path
    split_seen = 0
    for text in TEXTS:
        prompt = tok.encode("Say:")
        ids = tok.encode(text)
        split_seen += sum("\ufffd" in tok.decode([i]) for i in ids)  # a token holding part of a character
        s = Sequence(0, "r", 0, list(prompt), len(prompt), SamplingParams(max_tokens=1000), 0.0)
        deltas = []
        for t in ids:
            before = len(s.text)
            append_token(detok, s, t, None, frozenset(), 10**6)
            deltas.append(s.text[before:])
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids) == s.text
    assert split_seen > 0


def test_special_tokens_skipped_or_kept():
    tok = bundled_tokenizer()
    detok = Detokenizer(tok)
    ids = tok.encode("Hello") + [tok.convert_tokens_to_ids("<|im_end|>")] + tok.encode(" world")
    for skip in (True, False):
        s = Sequence(0, "r", 0, [1], 1, SamplingParams(skip_special_tokens=skip), 0.0)
        for t in ids:
            append_token(detok, s, t, None, frozenset(), 10**6)
        assert s.text == tok.decode(ids, skip_special_tokens=skip)


def test_byte_tables_decode_random_ids_like_the_tokenizer():
    """Random token runs (special tokens, split and invalid UTF-8 included): the incremental text plus
    the final flush equals the tokenizer's own decode, special tokens skipped or kept."""
    import random

    tok = bundled_tokenizer()
    detok = Detokenizer(tok)
    rng = random.Random(7)
    for trial in range(200):
        ids = [rng.randrange(len(tok)) if rng.random() < 0.9 else rng.randrange(5) for _ in range(rng.randrange(1, 40))]
        skip = trial % 2 == 0
        s = Sequence(0, "r", 0, [1], 1, SamplingParams(skip_special_tokens=skip, max_tokens=100), 0.0)
        text = ""
        for t in ids:
            s.token_ids.append(t)
            text += detok.step(s, len(s.token_ids) - 1)
        text += detok.flush(s)
        assert text == tok.decode(ids, skip_special_tokens=skip)


def test_window_path_for_tokenizers_without_byte_tables():
    tok = bundled_tokenizer()
    detok = Detokenizer(tok)
    detok.tables = None  # as for a SentencePiece-style tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        s = Sequence(0, "r", 0, [1], 1, SamplingParams(max_tokens=1000), 0.0)
        for t in ids:
            append_token(detok, s, t, None, frozenset(), 10**6)
        assert s.text == tok.decode(ids)
