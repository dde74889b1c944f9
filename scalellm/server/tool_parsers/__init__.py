"""Tool calls in model output, per format: see base.py for the contract every parser keeps."""
from __future__ import annotations

from .base import Parsed, Piece, ToolCall, ToolCallDelta, ToolParser
from .forced import JsonArrayParser, NamedParser
from .hermes import HermesParser
from .llama3 import Llama3JsonParser
from .mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "json_array": JsonArrayParser,  # internal: tool_choice "required"
    "named": NamedParser,  # internal: tool_choice names a function; takes its name
}
MODEL_FORMATS = ("hermes", "llama3_json", "mistral")  # the formats a model writes on its own


def get_parser(name: str, *args) -> ToolParser:
    """A fresh parser (one per output); "named" takes the function's name: get_parser("named", "f")."""
    try:
        cls = PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(PARSERS)}") from None
    return cls(*args)


__all__ = ["PARSERS", "MODEL_FORMATS", "get_parser", "ToolParser", "ToolCall", "ToolCallDelta", "Parsed", "Piece",
           "HermesParser", "Llama3JsonParser", "MistralParser", "JsonArrayParser", "NamedParser"]
