"""Chat templates that ship with the server."""
from __future__ import annotations

import os


def tools_template(tokenizer) -> str | None:
    """The template for conversations with tools: the model's own if it renders tools, else the ChatML
    template with tool support that ships with the server (the bundled model's format)."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if own is not None and "tools" in own:
        return None
    with open(os.path.join(os.path.dirname(__file__), "chatml_tools.jinja")) as f:
        return f.read()
