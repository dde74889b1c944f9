"""OpenAI-shaped errors: every failure a client can cause becomes one of these, never a traceback."""
from __future__ import annotations

import asyncio
import hmac
import logging
import re

import msgspec
from aiohttp import web

from scalellm.server.protocol import ErrorBody, ErrorResponse, encoder

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 502: "bad_gateway", 503: "service_unavailable", 504: "timeout"}
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `(\w+)`")
_FIELD = re.compile(r"^([a-z_]+)\b")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(ErrorBody(message, _TYPES.get(status, "invalid_request_error"), param, code))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(status, message, param, code)
    return web.Response(status=status, body=encoder.encode(body), content_type="application/json",
                        headers=headers)


def from_api_error(e: APIError) -> web.Response:
    return error_response(e.status, e.message, e.param, e.code, e.headers)


def bad_body(e: Exception) -> APIError:
    """A body that is not valid JSON, or not the request's shape."""
    message = str(e)
    if isinstance(e, UnicodeDecodeError):
        return APIError(400, "request body is not valid UTF-8")
    if not isinstance(e, msgspec.ValidationError):  # (ValidationError subclasses DecodeError)
        return APIError(400, f"request body is not valid JSON: {message}")
    path = _PATH.search(message)
    missing = _MISSING.search(message)
    parts = [p for p in (path.group(1) if path else "", missing.group(1) if missing else "") if p]
    return APIError(400, message, param=".".join(parts) or None)


def decode_body(decoder, body: bytes):
    """The body decoded into the request's struct, or the client's 400."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError) as e:
        raise bad_body(e) from None


def bad_value(e: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError from validation; its message starts with the field's name when it names one."""
    message = str(e)
    m = _FIELD.match(message)
    return APIError(400, message, param=m.group(1) if m else default_param)


async def respond(request: web.Request, handler, api_key: str | None, public: frozenset[str],
                  max_body_bytes: int) -> tuple[web.StreamResponse, str | None]:
    """The handler's response, or the OpenAI-shaped error it raised, and that error's message. When a key
    is set every path needs `Authorization: Bearer api_key`, except those in `public` (an allow-list of
    exact paths: a route added later is protected by default). (Server and gateway share it.)"""
    if api_key and request.path not in public:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            message = "invalid or missing API key (send Authorization: Bearer KEY)"
            return error_response(401, message, code="invalid_api_key"), message
    try:
        return await handler(request), None
    except APIError as e:
        return from_api_error(e), e.message
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.status != 413 else f"request body exceeds the limit of {max_body_bytes} bytes"
        return error_response(e.status, message), message
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logging.getLogger("scalellm.server").exception("internal error on %s", request.path)
        return error_response(500, "internal server error"), "internal server error"
