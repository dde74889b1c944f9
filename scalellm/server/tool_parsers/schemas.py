"""The `tools` of a chat request: their validation, and the JSON schemas a grammar forces for tool_choice."""
from __future__ import annotations

import re

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _object_schema(params) -> bool:
    if not isinstance(params, dict):
        return False
    if not params:  # {} is read as "no parameters"
        return True
    if "properties" in params and not isinstance(params["properties"], dict):
        return False
    return params.get("type") == "object" or "type" not in params and "properties" in params


def _check_function(fn, where: str) -> str:
    """The function's name; raises ValueError saying what is wrong with it."""
    if not isinstance(fn, dict):
        raise ValueError(f"{where} must be an object")
    name = fn.get("name")
    if name is None:
        raise ValueError(f"{where}.name is required")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -, got {name!r}")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ValueError(f"{where}.description must be a string")
    if fn.get("parameters") is not None and not _object_schema(fn["parameters"]):
        raise ValueError(f"{where}.parameters must be a JSON schema of type object")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise ValueError(f"{where}.strict must be a boolean")
    return name


def check_tools(tools: list[dict]) -> None:
    """Raise ValueError, saying which tool and what is wrong, unless tools is a list of
    {"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}} with distinct names."""
    if not isinstance(tools, list):
        raise ValueError("tools must be an array")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"{where} must be an object")
        if tool.get("type") != "function":
            raise ValueError(f'{where}.type must be "function", got {tool.get("type")!r}')
        if "function" not in tool:
            raise ValueError(f"{where}.function is required")
        name = _check_function(tool["function"], f"{where}.function")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is already the name of tools[{seen[name]}]")
        seen[name] = i


def named_schema(tool: dict) -> dict:
    """The schema of a (checked) tool's arguments: its parameters, always of type object."""
    params = tool["function"].get("parameters")
    if not params:
        return dict(EMPTY_PARAMETERS)
    return params if "type" in params else {"type": "object", **params}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """The schema of a tool_choice "required" output: an array of one call (or more, when parallel),
    each {"name": <a tool's name>, "parameters": <its arguments>}."""
    items = [{
        "type": "object",
        "properties": {"name": {"const": tool["function"]["name"]}, "parameters": named_schema(tool)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for tool in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
