"""OpenAI-compatible HTTP server (FastAPI + uvicorn): routes only; the work is in serving_chat.py,
serving_completion.py and async_engine.py.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]      (need the API key when one is set)
    POST /tokenize   POST /detokenize                                       (vLLM's; the API key too)
    GET|HEAD /health   GET /version   GET /metrics (Prometheus)

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}` with status 400 (bad request; a POST body
not sent as application/json, as in vLLM), 401 (API key), 404 (unknown model or route), 500 (engine failure), 503
(shutting down).
SIGTERM / SIGINT: new requests are refused, running ones get `shutdown_timeout` seconds to finish, then are
aborted (their streams end with finish_reason "abort"), and the process exits: status 0 after SIGTERM, 130 after
Ctrl-C (the CLI's KeyboardInterrupt). An engine that cannot run requests any more (its thread died, a tensor-parallel
worker exited, the CUDA device broke) shuts the server down the same way, with one error line and status 1, as vLLM's
does; a step that merely failed answers its requests 500 and the server goes on.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from .. import __version__
from .async_engine import AsyncEngine
from .metrics import ServerMetrics, StatsLog
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, now,
                       parse_request)
from .serving import ServingContext
from .serving_chat import create_chat_completion
from .serving_completion import create_completion
from .serving_tokenize import detokenize, tokenize

logger = logging.getLogger("deltaserve.serve")


def _error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _api_key_check(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Missing or wrong API key: send it as 'Authorization: Bearer <key>'.", None,
                           "invalid_api_key")
    return check


async def _json_body(request: Request) -> bytes:
    """The body of a POST that must be JSON. Other media types are refused, as vLLM does: a text/plain or form POST
    is one a browser sends cross-origin without asking first, so any web page could make its visitor generate here."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(400, f"The request body must be JSON sent with 'Content-Type: application/json', got "
                            f"{media_type or 'no Content-Type'!r}.")
    try:
        return await request.body()
    except ClientDisconnect:  # gone mid-upload: nobody reads the answer, and uvicorn logged a traceback for each
        raise APIError(499, "the client disconnected before sending the whole request") from None


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None, trust_request_chat_template: bool = False,
              model_root: str | None = None, exclude_tools_when_tool_choice_none: bool = False,
              log_stats_interval: float = 0.0) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the engine thread. model_root: the checkpoint the model was
    loaded from (/v1/models' `root`; the served name when not given)."""
    ctx = ServingContext(engine, model_name, trust_request_chat_template, exclude_tools_when_tool_choice_none)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        ticker = None
        if metrics is not None and log_stats_interval > 0:
            ticker = asyncio.create_task(_log_stats(StatsLog(metrics, engine, log_stats_interval, logger.info)))
        yield
        if ticker is not None:
            ticker.cancel()
        engine.stop()

    app = FastAPI(title="deltaserve", version=__version__, lifespan=lifespan)
    app.add_exception_handler(APIError, lambda request, e: _error_response(e))
    app.add_exception_handler(StarletteHTTPException, lambda request, e: _error_response(  # keeps a 405's Allow
        APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}."), e.headers))
    app.add_exception_handler(RequestValidationError, lambda request, e: _error_response(
        APIError(400, f"Invalid request: {e.errors()[0].get('msg', 'bad input')}.")))
    # a bug of ours while building a response: still an OpenAI-shaped 500 (Starlette logs the traceback), as a stream
    # ends with an error chunk, not a plain-text "Internal Server Error"
    app.add_exception_handler(Exception, lambda request, e: _error_response(
        APIError(500, f"internal error: {type(e).__name__}: {e}")))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await _json_body(request))
        return await create_chat_completion(ctx, req, request)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await _json_body(request))
        return await create_completion(ctx, req, request)

    def model_card() -> dict:
        # vLLM's ModelCard fields: `vllm bench serve` without --model reads data[0]["root"] as its tokenizer path
        return {"id": model_name, "object": "model", "created": now(), "owned_by": "deltaserve",
                "root": model_root or model_name, "parent": None, "max_model_len": ctx.max_model_len}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")  # OpenAI's retrieve (the openai client's models.retrieve); :path: "org/name"
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{model_name}'.", "model",
                           "model_not_found")
        return model_card()

    app.include_router(v1)
    tokens = APIRouter(dependencies=[Depends(_api_key_check(api_key))])  # vLLM's paths, outside /v1

    @tokens.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        return tokenize(ctx, parse_request(TokenizeRequest, await _json_body(request)))

    @tokens.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        return detokenize(ctx, parse_request(DetokenizeRequest, await _json_body(request)))

    app.include_router(tokens)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some load balancers probe with
    async def health() -> Response:
        return Response(status_code=200 if engine.alive and engine.accepting else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        if metrics is None:
            return Response(b"", media_type=ServerMetrics.content_type)
        return Response(metrics.render(), media_type=ServerMetrics.content_type)

    return app


async def _log_stats(stats: StatsLog) -> None:
    while True:
        await asyncio.sleep(stats.interval)
        stats.tick()


class _Server(uvicorn.Server):
    """uvicorn.Server that, on SIGTERM/SIGINT, tells the engine to finish within `grace_s` and then abort."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float):
        super().__init__(config)
        self.engine, self.grace_s = engine, grace_s
        self.engine_failure: str | None = None  # why the engine died, when that ended the server
        self.signals: list[int] = []  # the SIGTERM / SIGINT received, in order
        engine.on_dead = self.engine_died

    def engine_died(self, reason: str) -> None:
        """On the event loop: the engine cannot run requests any more, so stop serving (a supervisor restarts us)."""
        logger.error("the engine cannot run requests any more (%s); shutting the server down", reason)
        self.engine_failure = reason
        self.engine.begin_shutdown(self.grace_s)
        self.should_exit = True

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            logger.info("shutting down: requests still running in %.1f s will be aborted", self.grace_s)
        loop = self.engine.loop
        if loop is not None:  # not directly: the handler may interrupt the loop thread inside an Event lock
            loop.call_soon_threadsafe(self.engine.begin_shutdown, self.grace_s)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signals it caught once it has shut down. SIGTERM then killed the process (status
        # -15, skipping atexit and the TP workers' orderly stop) after a clean shutdown, and SIGINT reached
        # asyncio.run's own handler as the server's task was ending: it became a KeyboardInterrupt (status 130)
        # or, when the task had no await left, was lost (status 0; seen under load in CI). So neither is re-raised:
        # run_server exits 0 after SIGTERM and raises KeyboardInterrupt after SIGINT itself.
        self.signals.append(sig)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29; older ones do not re-raise
        if captured and captured[-1] == sig:
            captured.pop()


def run_server(llm, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               shutdown_timeout: float = 5.0, log_level: str = "info",
               trust_request_chat_template: bool = False, model_root: str | None = None,
               exclude_tools_when_tool_choice_none: bool = False, log_stats_interval: float = 10.0) -> None:
    """Serve a built `LLM` until SIGTERM/SIGINT; model_root: the checkpoint it was loaded from (see build_app);
    log_stats_interval: seconds between the stats lines logged while requests run (metrics.StatsLog; 0: none)."""
    metrics = ServerMetrics(model_name)
    engine = AsyncEngine(llm, metrics)
    metrics.attach(engine)
    app = build_app(engine, model_name, api_key, metrics, trust_request_chat_template, model_root,
                    exclude_tools_when_tool_choice_none, log_stats_interval)
    # the backstop: uvicorn cancels whatever still runs a little after the engine has aborted it
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 2)
    logger.info("serving %r on http://%s:%d (OpenAI API under /v1)", model_name, host, port)
    server = _Server(config, engine, shutdown_timeout)
    server.run()
    if server.engine_failure is not None:
        raise SystemExit(1)  # logged by engine_died
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt  # Ctrl-C: the CLI's status 130
