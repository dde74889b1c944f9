"""Chat templates that ship with the server."""
from __future__ import annotations

import os


def template_for(tokenizer, conversation: list[dict], tools: list[dict] | None) -> str | None:
    """The template a conversation takes when none is given: the model's own (None), unless tools or tool
    turns are involved and the model's template knows no tools."""
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in conversation):
        return tools_template(tokenizer)
    return None


def tools_template(tokenizer) -> str | None:
    """The template for conversations with tools: the model's own if it renders tools, else the ChatML
    template with tool support that ships with the server (the bundled model's format)."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if own is not None and "tools" in own:
        return None
    with open(os.path.join(os.path.dirname(__file__), "chatml_tools.jinja")) as f:
        return f.read()
