"""Every error a client can get, in OpenAI's shape, mapped to HTTP in one place.

    GatewayError
    ├── ClientError
    │   ├── BadRequest            400 invalid_request_error
    │   ├── Unauthorized          401 authentication_error
    │   ├── Forbidden             403 permission_error (a valid key, not for this; open mode:
    │   │                             a request not addressed to this gateway)
    │   ├── UnknownModel          404 invalid_request_error / model_not_found
    │   ├── NotFound              404 invalid_request_error (no such route)
    │   │   └── ResponseNotFound     404 / response_not_found (a stored response whose replica
    │   │                             is gone, or one this gateway never saw)
    │   ├── ApiNotServed          400 invalid_request_error / api_not_served (the model's
    │   │                             engine has no such API, e.g. LMDeploy and /v1/rerank)
    │   ├── MethodNotAllowed      405 invalid_request_error (+ Allow)
    │   ├── TooLarge              413 invalid_request_error
    │   ├── UnsupportedMediaType  415 invalid_request_error (a body that is not JSON)
    │   ├── RateLimited           429 rate_limit_error (+ Retry-After)
    │   └── ClientGone            499 (counted, never seen: the client hung up)
    └── UpstreamError             (may_retry: the request never reached an engine)
        ├── UpstreamFailed        502 upstream_error
        ├── NoReadyReplica        503 service_unavailable (+ Retry-After)
        │   └── ShuttingDown      503 service_unavailable / shutting_down
        └── UpstreamTimeout       504 timeout

`response()` renders every one of them, headers included. Engines' own error bodies differ
(vLLM nests them under "error", SGLang and LMDeploy send them flat, 401s are bare strings);
`from_upstream` turns any of them into the one shape.
"""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(
        self, message: str, param: str | None = None, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after is not None:
            self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """What the response carries besides its body."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        return JSONResponse(body, self.status, headers=self.headers())


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"


class BadRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class UnknownModel(ClientError):
    status = 404
    code = "model_not_found"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ResponseNotFound(NotFound):
    code = "response_not_found"


class ApiNotServed(ClientError):
    code = "api_not_served"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class TooLarge(ClientError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after = 1


class ClientGone(ClientError):
    """The client disconnected before its answer was whole (nginx's 499): counted, never sent."""

    status = 499
    code = "client_closed_request"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, may_retry: bool = False) -> None:
        super().__init__(message)
        self.may_retry = may_retry  # it failed before reaching an engine: another replica may


class UpstreamFailed(UpstreamError):
    pass


class NoReadyReplica(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "no_ready_replica"
    retry_after = 5  # a restarting replica or another gateway instance may take it by then


class ShuttingDown(NoReadyReplica):
    code = "shutting_down"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    # A message may quote the client's input, and JSON can smuggle in a lone surrogate
    # ("\ud800") that UTF-8 cannot encode: the response would fail as a bare 500.
    message = message.encode(errors="replace").decode()
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_upstream(status: int, body: bytes) -> dict:
    """Any engine's error body → OpenAI's shape, keeping its message, type, param and code."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        inner = data["error"]
    elif isinstance(data, dict) and "message" in data:
        inner = data  # SGLang / LMDeploy: flat
    else:
        text = (
            data["error"]
            if isinstance(data, dict) and "error" in data
            else body.decode(errors="replace")
        )
        inner = {"message": str(text)[:1000] or f"upstream answered HTTP {status}"}
    default_type = "invalid_request_error" if status < 500 else "upstream_error"
    return error_body(
        str(inner.get("message", "")),
        str(inner.get("type") or default_type),
        inner.get("param"),
        inner.get("code", status),
    )


def install_handlers(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        return BadRequest(f"invalid request: {exc}").response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return NotFound(f"no route {request.method} {request.url.path}").response()
        body = error_body(str(exc.detail), "invalid_request_error", None, exc.status_code)
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this; the client gets the one shape, not text.
        return GatewayError("internal error in the gateway; see its log").response()

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
