"""Every error a client can get, in OpenAI's shape, mapped to HTTP in one place.

    GatewayError
    ├── ClientError
    │   ├── BadRequest        400 invalid_request_error
    │   ├── Unauthorized      401 authentication_error
    │   ├── Forbidden         403 permission_error (a valid key, not for this)
    │   ├── UnknownModel      404 invalid_request_error / model_not_found
    │   ├── NotFound          404 invalid_request_error (no such route)
    │   ├── TooLarge          413 invalid_request_error
    │   └── RateLimited       429 rate_limit_error (+ Retry-After)
    └── UpstreamError
        ├── UpstreamFailed    502 upstream_error
        ├── NoReadyReplica    503 service_unavailable
        └── UpstreamTimeout   504 timeout

Engines' own error bodies differ (vLLM nests them under "error", SGLang and LMDeploy send them
flat, 401s are bare strings); `from_upstream` turns any of them into the one shape.
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

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status)


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


class TooLarge(ClientError):
    status = 413
    code = "request_too_large"


class RateLimited(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers["Retry-After"] = str(self.retry_after)
        return response


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamFailed(UpstreamError):
    pass


class NoReadyReplica(UpstreamError):
    status = 503
    type = "service_unavailable"
    code = "no_ready_replica"
    retry_after = 5  # a restarting replica or another gateway instance may take it by then

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers["Retry-After"] = str(self.retry_after)
        return response


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

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
