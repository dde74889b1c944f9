"""A chat request's tools and tool_choice, resolved as OpenAI defines them: what the chat template sees,
the grammar that forces a call (a named function, or "required"), and the parser that reads calls
back out of the text (the same grammar's output, or the model's own format under "auto")."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scalellm.server import tool_parsers
from scalellm.server.errors import APIError
from scalellm.server.tool_parsers.schemas import check_tools, named_schema, required_schema
from scalellm.structured import StructuredOutputsParams


@dataclass
class ToolPlan:
    tools: list[dict] | None  # handed to the chat template
    constraint: StructuredOutputsParams | None  # forces the call's shape
    new_parser: Callable[[], tool_parsers.ToolParser] | None  # one per choice; None: plain content
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.constraint is not None


def plan_tools(req, auto_parser: str | None) -> ToolPlan:
    """auto_parser: --tool-call-parser when --enable-auto-tool-choice is on, else None."""
    tools = req.tools
    choice = req.tool_choice
    parallel = req.parallel_tool_calls is not False
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan(None, None, None, parallel)
    try:
        check_tools(tools)
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice == "none":
            return ToolPlan(tools, None, None, parallel)
        if choice == "auto":
            if auto_parser is None:
                raise APIError(400, 'tool_choice "auto" needs the server started with --enable-auto-tool-choice '
                                    'and --tool-call-parser', param="tool_choice")
            return ToolPlan(tools, None, lambda: tool_parsers.get_parser(auto_parser), parallel)
        if choice == "required":
            schema = required_schema(tools, parallel)
            return ToolPlan(tools, StructuredOutputsParams(json=schema), lambda: tool_parsers.get_parser("json_array"),
                            parallel)
        raise APIError(400, f'tool_choice must be "none", "auto", "required" or a named function; got {choice!r}',
                       param="tool_choice")
    if choice.type != "function":
        raise APIError(400, f"tool_choice.type must be function, got {choice.type!r}", param="tool_choice")
    name = choice.function.name
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(tools, StructuredOutputsParams(json=named_schema(tool)),
                    lambda: tool_parsers.NamedParser(name), parallel)
