"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, or on
Anthropic's Messages API (/v1/messages...) in its: {"type": "error", "error": {"type", "message"}}.

Handlers raise typed exceptions; `error_response` is the one place they become statuses."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from loragate.adapters.errors import AdapterError, AdapterNotFound
from loragate.engine.async_engine import EngineDeadError
from loragate.engine.errors import AdapterNotFoundError, InvalidRequestError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(message: str, param: str | None = "model", code: str = "model_not_found") -> APIError:
    return APIError(404, message, "not_found_error", param, code)


def to_api_error(exc: Exception) -> APIError:
    """Map a known exception to its status; anything else is a 500 without internals."""
    from .uploads import UploadError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):  # Starlette's own: an unknown path or method
        return APIError(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                        else "invalid_request_error", headers=dict(exc.headers or {}))
    if isinstance(exc, RecursionError):  # JSON nested past Python's limit, in parsing or walking it
        return APIError(400, "the request nests too deeply (more than about 900 levels of JSON)")
    if isinstance(exc, AdapterNotFoundError):
        return not_found(str(exc))
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, AdapterNotFound):
        return not_found(str(exc), param="name", code="adapter_not_found")
    if isinstance(exc, AdapterError):
        return APIError(413 if exc.code == "too_large" else 422, str(exc), code=exc.code)
    if isinstance(exc, UploadError):
        return APIError(exc.status, str(exc), code=exc.code)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "server_error", code="engine_dead")
    from loragate.adapters.s3_client import StoreUnavailableError  # boto3 itself stays unimported

    if isinstance(exc, StoreUnavailableError):
        return APIError(503, str(exc), "server_error", code="store_unavailable", headers={"Retry-After": "5"})
    from jinja2 import TemplateError, TemplateSyntaxError

    if isinstance(exc, TemplateError) and not isinstance(exc, TemplateSyntaxError):
        # The model's chat template refusing the conversation (raise_exception: Gemma's "System
        # role not supported", Mistral's roles that must alternate) is about the request; a
        # template that does not parse stays the server's fault.
        return APIError(400, f"the model's chat template refused these messages: {exc}", param="messages")
    return APIError(500, "internal server error", "server_error")


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_body(error: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(exc: Exception, path: str = "") -> JSONResponse:
    """The response for an error on `path` (the request's, which picks the shape)."""
    err = to_api_error(exc)
    body = anthropic_body(err) if path.startswith("/v1/messages") else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)
