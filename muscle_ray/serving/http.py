"""The gateway's HTTP face: FastAPI routes, the API key, the body-size limit, and one error shape.

    request ─> RequireKey (401) ─> BodyLimit (413) ─> route (pydantic: 400) ─> Gateway ─> replicas

Every answer that is not a success is OpenAI's error object `{"error": {"message", "type",
"param", "code"}}`: a client's mistake (400/401/404/405/413), a replica that cannot answer now
(503 with Retry-After), and a bug (500, the traceback in the replica's log, not the response).
The key and the body size are checked before the body is parsed. The OpenAPI schema is served
at `/openapi.json` behind the key like everything else but `/healthz`; there is no `/docs` page.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from muscle_ray.serving import chat
from muscle_ray.serving.api import ApiError, ChatCompletionRequest, CompareRequest, CompletionRequest, ErrorResponse
from muscle_ray.serving.gateway import Gateway

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/healthz"}  # answered without the key: it reveals nothing
ERRORS: dict = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def error(
    status: int,
    message: str,
    param: str | None = None,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return error_response(ApiError(status, message, param, type, code), headers)


def error_response(e: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    """OpenAI's error object; ASCII-escaped, so a message quoting any input still encodes."""
    return Response(
        json.dumps(e.body()),
        status_code=e.status,
        media_type="application/json",
        headers={**(e.headers() or {}), **(headers or {})},
    )


def route_path(scope) -> str:
    """The path under the app's route prefix (Serve passes the prefix as root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


class RequireKey:
    """With a key set, every path but OPEN_PATHS needs `Authorization: Bearer <key>` (401 first)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and route_path(scope) not in OPEN_PATHS:
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """A body over `max_bytes` is refused (413) before anything parses it: by its Content-Length
    when it has one, else by counting while it is read; the body read is replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.strip().isdigit():
            return await error(400, "Content-Length: not a number", code="bad_content_length")(scope, receive, send)
        if declared is not None and int(declared) > self.max_bytes:
            return await self._too_large(int(declared))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(size, "at least ")(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads: disconnect notices for streaming answers
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int, qualifier: str = "") -> Response:
        return error(
            413,
            f"body: {qualifier}{size} bytes, more than the limit of {self.max_bytes} (limits.max_body_bytes)",
            code="request_too_large",
        )


# -- routes --------------------------------------------------------------------------------------
router = APIRouter()


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness for load balancers; open even when an API key is set."""
    return {"status": "ok"}


@router.get("/v1/models", responses=ERRORS)
async def list_models(gw: Gateway = Depends(gateway)) -> dict:
    return gw.models()


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, gw: Gateway = Depends(gateway)) -> dict:
    return await gw.completions(body)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={**ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}}}},
)
async def chat_completions(body: ChatCompletionRequest, gw: Gateway = Depends(gateway)) -> Response:
    result = await gw.chat(body)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(chat.stream(body.model, result, usage), media_type="text/event-stream")
    return JSONResponse(chat.response(body.model, result))


@router.post("/v1/compare", responses=ERRORS)
async def compare(body: CompareRequest, gw: Gateway = Depends(gateway)) -> dict:
    return await gw.compare(body)


@router.get("/v1/stats", responses=ERRORS)
async def stats(gw: Gateway = Depends(gateway)) -> dict:
    return gw.stats()


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> dict:
    return request.app.openapi()


# -- errors --------------------------------------------------------------------------------------
async def _client_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


_BRANCHES = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc) -> str | None:
    """The dotted field of a pydantic error location (`messages.0.content`), without "body" and
    the union-branch labels pydantic adds (`str`, `function-after[_unicode(), str]`)."""
    parts = [str(x) for x in loc if isinstance(x, int) or (x != "body" and x not in _BRANCHES and x.isidentifier())]
    return ".".join(parts) or None


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    """pydantic's report -> 400 naming the first bad field."""
    err = exc.errors()[0]
    param = field_path(err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return error(400, f"{param or 'body'}: {msg}", param)


async def _http(request: Request, exc: HTTPException) -> Response:
    """Starlette's own answers (no such route, wrong method, unreadable body) in the same shape."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{exc.detail}: {request.method} {route_path(request.scope)}"
    return error(exc.status_code, message, code=codes.get(exc.status_code), headers=exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    logger.error("%s %s failed", request.method, route_path(request.scope), exc_info=exc)
    return error(
        500,
        f"internal error ({type(exc).__name__}); the gateway's log has the details",
        type="server_error",
        code="internal_error",
    )


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Serve runs the app's shutdown when a gateway replica stops (scale-down, redeploy, `serve
    shutdown`): the shadow rows still held are written then."""
    yield
    await app.state.gateway.close()


def build_api(gw: Gateway) -> FastAPI:
    """The FastAPI app of one gateway replica (its key and limits are the gateway's)."""
    api = FastAPI(
        title="muscle-ray serve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="OpenAI-compatible completions and chat, and an old-vs-new compare endpoint.",
    )
    api.state.gateway = gw
    api.include_router(router)
    api.add_exception_handler(ApiError, _client_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    api.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    api.add_exception_handler(Exception, _crash)
    api.add_middleware(BodyLimit, max_bytes=gw.cfg.limits.max_body_bytes)
    api.add_middleware(RequireKey, key=gw.key)  # added last: runs first
    return api
