"""The one error type of the HTTP side and the one place it becomes the documented wire envelope.

Everything that goes wrong — a bad key, a bad parameter, a full queue, an engine refusal, FastAPI's own
validation and routing errors — ends up as

    HTTP <status>   {"error": {"code": "<business code>", "message": "<message>"}}

with the status and code pairs of spec §1.7/§1.8. Messages are the platform's Chinese text (what users of the
real service see and search for), followed by an English detail when we have one.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glmstack.protocol import (
    EngineOverloadedError,
    EngineRequestError,
    InvalidConstraintError,
    PromptTooLongError,
)
from glmstack.store.errors import StoreUnavailableError

log = logging.getLogger(__name__)

# business code -> (HTTP status, message). Codes 1001/1003/1004 are the real platform's (not in the doc's
# table, which only shows 1002 in an example); the statuses follow spec §1.8.
CODES: dict[int, tuple[int, str]] = {
    500: (500, "内部错误"),
    1000: (401, "身份验证失败。"),
    1001: (401, "Header中未收到Authorization参数，无法进行身份验证。"),
    1002: (401, "Authorization Token非法，请确认Authorization Token正确传递。"),
    1003: (401, "Authorization Token已过期，请重新生成/获取。"),
    1004: (401, "Authorization Token验证失败。"),
    1120: (500, "无法成功访问您的账户，请稍后重试。"),
    1200: (400, "API 调用错误"),
    1210: (400, "API 调用参数有误，请检查文档。"),
    1211: (400, "模型不存在，请检查模型代码。"),
    1213: (400, "未正常接收到{field}参数。"),
    1214: (400, "{field}参数非法。请检查文档。"),
    1222: (404, "API {api} 不存在"),
    1232: (400, "获取异步请求结果时，请使用task_id"),
    1233: (404, "任务：{task_id} 不存在"),
    1234: (500, "网络错误，错误id：{error_id}，请联系客服"),
    1261: (400, "Prompt 超长"),
    1301: (
        400,
        "系统检测到输入或生成内容可能包含不安全或敏感内容，请您避免输入易产生敏感内容的提示语，感谢您的配合。",
    ),
    1302: (429, "您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。"),
    1305: (429, "当前API请求过多，请稍后重试。"),
    # Not a business code of the table but the HTTP status the doc gives oversized uploads (spec §1.6, "文件大小
    # 超过100MB"), with the cap that applied named in the message.
    435: (435, "文件大小超过{limit}"),
}


CLIENT_CLOSED_REQUEST = 499


class PlatformError(Exception):
    """An error with a platform business code. `detail` (English) is appended to the documented message;
    `fields` fill the message's placeholders; `extra` adds top-level keys next to "error" (e.g. the
    content_filter of a 1301)."""

    def __init__(
        self,
        code: int,
        detail: str | None = None,
        *,
        http_status: int | None = None,
        extra: dict[str, Any] | None = None,
        **fields: str,
    ) -> None:
        default_status, template = CODES[code]
        self.code = code
        self.http_status = http_status or default_status
        message = template.format(**fields) if fields else template
        self.message = f"{message} ({detail})" if detail else message
        self.extra = extra or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": str(self.code), "message": self.message}, **self.extra}


def error_response(error: PlatformError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.http_status)


def from_engine(error: EngineRequestError) -> PlatformError:
    if isinstance(error, PromptTooLongError):
        return PlatformError(1261, str(error))
    if isinstance(error, EngineOverloadedError):
        return PlatformError(1305, str(error))
    if isinstance(error, InvalidConstraintError):  # a schema the grammar compiler refuses: a bad parameter
        return PlatformError(1214, str(error), field=error.field)
    return PlatformError(1210, str(error))


# What pydantic puts in an error's location besides field names: validator markers ("function-after[...]")
# and, inside a union, the member that failed ("str", "list[TextPart]", "constrained-str").
_NOT_A_FIELD = re.compile(r"str|int|float|bool|none|dict|list|constrained-.*|function-.*|.*\[.*")


def field_name(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    name = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _NOT_A_FIELD.fullmatch(str(part)):
            name += f".{part}" if name else str(part)
    return name


def from_validation(exc: RequestValidationError) -> PlatformError:
    first = exc.errors()[0]
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    field = field_name(loc)
    if kind == "json_invalid":
        return PlatformError(1210, "the request body is not valid JSON")
    if not field:  # the body as a whole: missing, or not a JSON object
        return PlatformError(1210, "the request body must be a JSON object (Content-Type: application/json)")
    if kind == "missing":
        return PlatformError(1213, f"{field} is required", field=field)
    return PlatformError(1214, f"{field}: {first.get('msg', 'invalid value')}", field=field)


def install(app: FastAPI) -> None:
    """Route every error through the envelope. Registered for Exception too: nothing leaves in FastAPI's
    default shapes."""

    @app.exception_handler(PlatformError)
    async def platform_error(request: Request, exc: PlatformError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            error = PlatformError(
                1222, http_status=exc.status_code, api=f"{request.method} {request.scope['path']}"
            )
        elif exc.status_code == 413:
            error = PlatformError(1210, str(exc.detail), http_status=413)
        elif exc.status_code < 500:
            error = PlatformError(1210, str(exc.detail), http_status=exc.status_code)
        else:
            error = PlatformError(500, str(exc.detail), http_status=exc.status_code)
        response = error_response(error)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(EngineRequestError)
    async def engine_error(request: Request, exc: EngineRequestError) -> JSONResponse:
        return error_response(from_engine(exc))

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        log.error("database unavailable: %s", exc)
        return error_response(PlatformError(1120, "the database is unavailable"))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is listening; 499 ("client closed request", nginx's convention) is for the request log.
        log.info(
            "client disconnected from %s %s; its generation was aborted",
            request.method,
            request.scope["path"],
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.scope["path"])
        return error_response(PlatformError(500))
