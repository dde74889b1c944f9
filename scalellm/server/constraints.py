"""A request's fields that shape its output, turned into sampling parameters or refused with a 400:
response_format, structured_outputs (and the older guided_* names), logit_bias, allowed_token_ids,
bad_words, and the fields this server does not implement (never ignored silently)."""
from __future__ import annotations

from msgspec import UNSET

from scalellm.server.errors import APIError
from scalellm.structured import StructuredOutputsParams
from scalellm.structured.params import KINDS, StructuredOutputError


def refuse_unsupported(req) -> None:
    """A 400 naming the first field given that would change the output and is not implemented."""
    def given(name: str, harmless=(None,)) -> bool:
        value = getattr(req, name, UNSET)
        return value is not UNSET and value not in harmless

    checks = [("best_of", (None, 1, req.n)), ("use_beam_search", (None, False)), ("length_penalty", (None, 1, 1.0)),
              ("logits_processors", (None, [])),
              ("suffix", (None, "")), ("functions", (None, [])), ("function_call", (None,)), ("audio", (None,)),
              ("modalities", (None, ["text"]))]
    for name, harmless in checks:
        if given(name, harmless):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if req.guided_whitespace_pattern is not None or (req.structured_outputs is not None
                                                     and req.structured_outputs.whitespace_pattern is not None):
        raise APIError(400, "whitespace_pattern is not supported; use disable_any_whitespace",
                       param="structured_outputs")


def request_constraint(req) -> tuple[str, StructuredOutputsParams] | tuple[None, None]:
    """The one output constraint a request names, from whichever of its three spellings, and the field
    that named it; two at once is a 400."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None:
        if rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            found.append(("response_format", _params("response_format", json=rf.json_schema.schema)))
        elif rf.type == "json_object":
            found.append(("response_format", _params("response_format", json_object=True)))
        elif rf.type != "text":
            raise APIError(400, f"response_format.type must be text, json_object or json_schema; got {rf.type!r}",
                           param="response_format")
    so = req.structured_outputs
    if so is not None:
        if so.disable_additional_properties and isinstance(so.json, dict):
            raise APIError(400, "disable_additional_properties is not supported; set additionalProperties: false "
                                "in the schema", param="structured_outputs")
        fields = {k: getattr(so, k) for k in KINDS}
        found.append(("structured_outputs", _params("structured_outputs", **fields,
                                                    disable_any_whitespace=so.disable_any_whitespace)))
    guided = {"json": req.guided_json, "regex": req.guided_regex, "choice": req.guided_choice,
              "grammar": req.guided_grammar}
    for kind, value in guided.items():
        if value is not None:
            found.append((f"guided_{kind}", _params(f"guided_{kind}", **{kind: value})))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"give one output constraint, not several: {names}", param=found[1][0])
    return found[0] if found else (None, None)


def _params(param: str, **fields) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param=param) from None


def logits_fields(req) -> dict:
    """logit_bias (token id strings as keys, as OpenAI sends them), allowed_token_ids and bad_words."""
    out = {}
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        out["logit_bias"] = bias
    if req.allowed_token_ids is not None:
        out["allowed_token_ids"] = req.allowed_token_ids
    if req.bad_words:
        out["bad_words"] = req.bad_words
    return out
