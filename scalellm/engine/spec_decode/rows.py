"""The rows a verifying sequence gives the sampler: row j is the sequence as if its first j drafts
were accepted, so each row samples with the key (seed, index, output position), the penalties,
min_tokens bans and bad words it would have had without speculation."""
from __future__ import annotations

from scalellm.engine.sequence import Sequence


class DraftRow:
    __slots__ = ("seq", "j", "seq_id")
    pending_forks = 0
    num_in_flight = 0  # speculative decoding runs synchronously: every token is on the host

    def __init__(self, seq: Sequence, j: int):
        self.seq = seq
        self.j = j
        self.seq_id = (seq.seq_id, j)

    @property
    def token_ids(self) -> list[int]:
        """Built when read: only rows with penalties or bad words need them."""
        return self.seq.token_ids + self.seq.draft[:self.j] if self.j else self.seq.token_ids

    @property
    def params(self):
        return self.seq.params

    @property
    def seed(self) -> int:
        return self.seq.seed

    @property
    def index(self) -> int:
        return self.seq.index

    @property
    def prompt_len(self) -> int:
        return self.seq.prompt_len

    @property
    def grammar(self):
        return self.seq.grammar

    @property
    def logits_changes(self):
        return self.seq.logits_changes

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def finished(self) -> bool:
        return self.seq.finished

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + self.j

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.seq.draft[:self.j]


def sampler_rows(ready: list[Sequence]) -> list:
    """One entry per logits row, in the runner's order: a sequence verifying k drafts has k + 1 rows."""
    rows: list = []
    for seq in ready:
        if seq.draft:
            rows += [DraftRow(seq, j) for j in range(len(seq.draft) + 1)]
        else:
            rows.append(seq)
    return rows
