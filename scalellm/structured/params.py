"""What a request asks its output to match: one JSON schema, regex, choice list or grammar."""
from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputError(ValueError):
    """A constraint that cannot be honored; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """Exactly one of the constraint fields is set (vLLM's StructuredOutputsParams).

    json: a JSON schema (dict, or its JSON text); regex: a regular expression the whole output matches;
    choice: the output is one of these strings; grammar: a Lark grammar (GBNF is converted);
    json_object: any JSON object; structural_tag: llguidance's structural tag (JSON text or dict).
    disable_any_whitespace: None takes the server's setting (compact JSON by default).
    """
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    disable_any_whitespace: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise StructuredOutputError(
                f"structured outputs take exactly one of {', '.join(KINDS)}; got {what}", "structured_outputs")
        if self.json is not None and not isinstance(self.json, (dict, str, bool)):
            raise StructuredOutputError("structured_outputs.json must be a JSON schema object", "structured_outputs")
        if self.regex is not None and not isinstance(self.regex, str):
            raise StructuredOutputError("structured_outputs.regex must be a string", "structured_outputs")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise StructuredOutputError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                        "structured_outputs")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise StructuredOutputError("structured_outputs.grammar must be a non-empty string", "structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self, compact_default: bool) -> tuple[str, str, bool]:
        """What identifies the compiled grammar: the kind, its text, and the whitespace rule."""
        value = getattr(self, self.kind)
        if isinstance(value, (dict, list)):
            value = jsonlib.dumps(value, separators=(",", ":"))  # key order kept: it orders the output
        compact = compact_default if self.disable_any_whitespace is None else self.disable_any_whitespace
        return self.kind, str(value), compact
