"""Anthropic's conventions on /v1/messages: `x-api-key`, and errors in Anthropic's shape.

Anthropic's SDK and Claude Code send their key as `x-api-key` (or, given an auth token,
`Authorization: Bearer`), and read errors as `{"type": "error", "error": {"type", "message"}}`,
the `type` following the status (https://docs.anthropic.com/en/api/errors). The gateway's
own errors and the engines' are turned into that shape here, with the status unchanged.
"""

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.auth import bearer_token
from gateway.errors import Unauthorized
from gateway.keys import KeyRecord
from gateway.tenancy import Tenancy

API_KEY_HEADER = "x-api-key"
# Headers a Messages client sets that the engine reads (vLLM and SGLang accept and ignore them
# today; a beta feature an engine learns later must not be lost on the way).
PASSED_HEADERS = ("anthropic-version", "anthropic-beta")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def authenticate(keys: Tenancy, request: Request) -> KeyRecord:
    """The caller's key from `Authorization: Bearer` or `x-api-key`; Unauthorized else."""
    if keys.is_open or bearer_token(request) is not None:
        return keys.authenticate(request)
    presented = request.headers.get(API_KEY_HEADER, "").strip()
    if not presented:
        raise Unauthorized("missing API key: send `x-api-key: <key>` or `Authorization: Bearer`")
    return keys.usable(presented)


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def error_body(status: int, message: str) -> dict:
    message = message.encode(errors="replace").decode()  # see errors.error_body
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message), status, headers=headers)


def error_event(message: str, status: int = 502) -> bytes:
    """The end of a Messages stream that failed after its first byte (Anthropic's `error`
    event; its streams have no [DONE])."""
    return f"event: error\ndata: {json.dumps(error_body(status, message))}\n\n".encode()
