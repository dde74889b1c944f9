"""Chat messages in (with tool calls and tool results) and the assistant's message out."""
from __future__ import annotations

import json

from msgspec import UNSET

from scalellm.server import protocol as P
from scalellm.server.errors import APIError

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def chat_conversation(messages: list[P.ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; a 400 names the first message at fault."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    conversation = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}",
                           param="messages")
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(part.text for part in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
            message["tool_calls"] = [_tool_call(i, k, call) for k, call in enumerate(m.tool_calls)]
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}]: a tool message needs tool_call_id", param="messages")
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        conversation.append(message)
    return conversation


def _tool_call(i: int, k: int, call: P.MessageToolCall) -> dict:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"messages[{i}].tool_calls[{k}].function.arguments is not valid JSON",
                           param="messages") from None
    return {"id": call.id or f"call_{i}_{k}", "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


def template_options(req: P.ChatCompletionRequest) -> dict:
    """Keyword arguments for the chat template beyond the messages and tools."""
    options = dict(req.chat_template_kwargs or {})
    for name in ("chat_template", "continue_final_message", "documents"):
        value = getattr(req, name)
        if value is not UNSET and value is not None:
            options[name] = value
    if options.get("continue_final_message") and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false", param="continue_final_message")
    return options


def chat_message(text: str, finish_reason: str | None, new_parser, tools) -> tuple[P.ChatResponseMessage, str | None]:
    """The assistant's message for a whole reply: tool calls read out of the text when the request's tools
    call for a parser (finish_reason "tool_calls" when there are any)."""
    if new_parser is None:
        return P.ChatResponseMessage("assistant", text), finish_reason
    parsed = new_parser().parse(text)
    calls = parsed.calls if tools.parallel else parsed.calls[:1]
    if not calls:
        return P.ChatResponseMessage("assistant", parsed.content if parsed.content is not None else text), finish_reason
    out = [P.ToolCallOut(c.id, P.ToolCallFunction(c.name, c.arguments)) for c in calls]
    return (P.ChatResponseMessage("assistant", parsed.content, tool_calls=out),
            "tool_calls" if finish_reason == "stop" else finish_reason)
