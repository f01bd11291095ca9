"""Engines' error bodies, whatever their shape, reach clients in OpenAI's."""

import json

import pytest

from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NoReadyReplica,
    RateLimited,
    ShuttingDown,
    TooLarge,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
    UpstreamFailed,
    UpstreamTimeout,
    from_upstream,
)


def body(data: object) -> bytes:
    return json.dumps(data).encode()


def error(message: str, type: str, param: str | None, code: object) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def test_vllm_nested_error_is_kept_as_is() -> None:
    vllm = error("max_tokens is too large", "BadRequestError", "max_tokens", 400)
    assert from_upstream(400, body(vllm)) == vllm


def test_sglang_flat_error_is_nested() -> None:
    sglang = {
        "object": "error",
        "message": "Requested token count exceeds the model's context length",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    assert from_upstream(400, body(sglang)) == error(
        "Requested token count exceeds the model's context length", "BadRequestError", None, 400
    )


def test_lmdeploy_flat_error_without_type_gets_a_default() -> None:
    lmdeploy = {"object": "error", "message": "The model `x` does not exist.", "code": 404}
    assert from_upstream(404, body(lmdeploy)) == error(
        "The model `x` does not exist.", "invalid_request_error", None, 404
    )


def test_bare_string_error() -> None:
    assert from_upstream(401, body({"error": "Unauthorized"})) == error(
        "Unauthorized", "invalid_request_error", None, 401
    )


@pytest.mark.parametrize(
    ("status", "raw", "message"),
    [
        (500, b"Internal Server Error", "Internal Server Error"),
        (502, b"<html><body>Bad Gateway</body></html>", "<html><body>Bad Gateway</body></html>"),
        (503, b"", "upstream answered HTTP 503"),
        (500, b"\xff\xfe not utf-8", "\ufffd\ufffd not utf-8"),
        (500, b'["a", "list"]', '["a", "list"]'),
    ],
)
def test_non_json_or_odd_bodies_become_the_message(status: int, raw: bytes, message: str) -> None:
    assert from_upstream(status, raw) == error(message, "upstream_error", None, status)


def test_huge_text_bodies_are_cut() -> None:
    result = from_upstream(500, b"x" * 100_000)
    assert result["error"]["message"] == "x" * 1000


@pytest.mark.parametrize(
    ("exc", "status", "type", "code"),
    [
        (BadRequest("m"), 400, "invalid_request_error", None),
        (Unauthorized("m"), 401, "authentication_error", "invalid_api_key"),
        (UnknownModel("m", "model"), 404, "invalid_request_error", "model_not_found"),
        (Forbidden("m"), 403, "permission_error", "forbidden"),
        (MethodNotAllowed("m", "POST"), 405, "invalid_request_error", "method_not_allowed"),
        (TooLarge("m"), 413, "invalid_request_error", "request_too_large"),
        (UnsupportedMediaType("m"), 415, "invalid_request_error", "unsupported_media_type"),
        (ShuttingDown("m"), 503, "service_unavailable", "shutting_down"),
        (UpstreamFailed("m"), 502, "upstream_error", None),
        (NoReadyReplica("m"), 503, "service_unavailable", "no_ready_replica"),
        (UpstreamTimeout("m"), 504, "timeout", "upstream_timeout"),
    ],
)
def test_gateway_errors_render_in_openai_shape(
    exc: GatewayError, status: int, type: str, code: str | None
) -> None:
    response = exc.response()
    assert response.status_code == status
    assert json.loads(response.body) == error("m", type, exc.param, code)


@pytest.mark.parametrize(
    ("exc", "headers"),
    [
        (BadRequest("m"), {}),
        (RateLimited("m", retry_after=7), {"retry-after": "7"}),
        (RateLimited("m"), {"retry-after": "1"}),
        (NoReadyReplica("m"), {"retry-after": "5"}),
        (ShuttingDown("m"), {"retry-after": "5"}),
        (MethodNotAllowed("m", "POST"), {"allow": "POST"}),
    ],
)
def test_headers_are_rendered_with_the_error(exc: GatewayError, headers: dict[str, str]) -> None:
    response = exc.response()
    extra = {
        k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
    }
    assert extra == headers
