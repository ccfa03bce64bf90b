"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

FastAPI's own 422 body never leaks: validation errors become 400s that name the field.
"""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.openai_api import ErrorInfo, ErrorResponse

logger = logging.getLogger("ray.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class OpenAIError(Exception):
    """Raised by route handlers; answered as `status` with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def overloaded(exc: Exception) -> OpenAIError:
    """Serve's own rejections (queue full, no replica) as OpenAI errors. Caught in the route: Serve installs
    its own plain-text handler for these exception types on the FastAPI app, over any of ours."""
    status = exc.status_code if isinstance(exc, BackPressureError) else 503
    return OpenAIError(status, f"server overloaded, retry later: {exc}", code="overloaded")


SERVE_REJECTIONS = (BackPressureError, DeploymentUnavailableError)
# The replica (or its node) went away under a request: another replica can take it while the client has seen nothing.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError)


def replica_lost(exc: Exception) -> OpenAIError:
    return OpenAIError(503, f"the replica serving this request was lost, retry: {type(exc).__name__}",
                       code="replica_lost")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    # a message may quote the client's text, a lone surrogate included (JSON's "\ud800"), which the UTF-8 body cannot
    # carry (answering failed: a 500): it is spelled out as the escape instead
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def describe_validation_error(errors: list[dict]) -> tuple[str, Optional[str]]:
    """(message, param) for the first pydantic error, naming the field a client got wrong."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if not loc:
        return f"request body must be a JSON object ({err.get('msg')})", None
    where = ".".join(p for p in loc if not _is_type_tag(p))
    if kind == "extra_forbidden":
        return f"unsupported field '{where}': this server does not implement it", where
    if kind == "missing":
        return f"missing required field '{where}'", where
    return f"invalid value for '{where}': {err.get('msg')}", where


def _is_type_tag(part: str) -> bool:
    # pydantic puts the union member it tried into the location: ('prompt', 'list[int]', 0)
    return any(c in part for c in "[]") or part in ("str", "int", "float", "bool")


def route_label(request: Request) -> str:
    """The route's template for metrics: any path a client invents would otherwise be a metric series of its own."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def install_error_handlers(app: FastAPI, on_error) -> None:
    """on_error(route, status) records the error for metrics."""

    def respond(request: Request, status: int, message: str, param=None, code=None) -> JSONResponse:
        on_error(route_label(request), status)
        return error_response(status, message, param, code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(list(exc.errors()))
        content_type = request.headers.get("content-type", "")
        if param is None and content_type and "json" not in content_type:  # curl -d sends a form: JSON never read
            message = f"request body must be JSON sent with 'Content-Type: application/json', not {content_type!r}"
        return respond(request, 400, message, param)

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError):
        return respond(request, exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return respond(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return respond(request, 500, f"internal server error: {type(exc).__name__}")
