"""A local server for coding agents: OpenAI Chat Completions / Completions and Anthropic Messages over HTTP.

    python -m mlx_qwen36.server --model PATH_OR_REPO [--host 127.0.0.1] [--port 8080] [--api-key KEY]
                                [--allowed-local-media DIR] [--prompt-caches 4] [--prompt-cache-gb 8] [--mtp [K]]

Routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/messages`, `/v1/messages/count_tokens`,
`/health`. Streaming is SSE. Requests are served one at a time, in order, by the engine's worker thread (the event
loop never runs the model); a client that disconnects cancels its generation. Each conversation's new turn prefills
only what is new (`engine`). Bad requests get a 4xx with an OpenAI- or Anthropic-style error body; `--api-key` is
checked on every route but `/health` (`Authorization: Bearer` or `x-api-key`). Built on Starlette and uvicorn.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import api_anthropic as anthropic
from . import api_openai as openai
from .api_openai import Reply, RequestError
from .engine import Engine, Job

MAX_BODY_BYTES = 64 << 20  # images travel as data URLs: room for a few, not for abuse


class Server:
    """The routes over one engine; `app` is the ASGI application."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None,
                 allowed_media: Path | None = None, max_body: int = MAX_BODY_BYTES,
                 generation: dict[str, Any] | None = None):
        self.engine, self.model_id, self.api_key, self.max_body = engine, model_id, api_key, max_body
        self.allowed_media = allowed_media.resolve() if allowed_media is not None else None
        self.generation = generation or {}  # server-wide stream_generate arguments (e.g. draft_tokens)
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ])

    # --- plumbing ---------------------------------------------------------------------------------------------

    def media(self, url: Any, where: str) -> None:
        """Refuse a media URL the server may not read: data URLs always pass; local files only under
        --allowed-local-media; the network is never fetched."""
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}: a media part needs a url", where)
        if url.startswith("data:"):
            return
        if url.startswith(("http://", "https://")):
            raise RequestError(f"{where}: remote media URLs are not fetched; send a data: URL", where)
        if self.allowed_media is None:
            raise RequestError(f"{where}: local files are refused (start the server with --allowed-local-media "
                               "DIR to allow a folder)", where)
        path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser().resolve()
        if not path.is_relative_to(self.allowed_media):
            raise RequestError(f"{where}: {path} is outside --allowed-local-media", where, status=403,
                               kind="permission_error")

    async def body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise RequestError(f"the request body is over {self.max_body} bytes", status=413)
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body:
                raise RequestError(f"the request body is over {self.max_body} bytes", status=413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise RequestError(f"model {model!r} is not served here (this server has {self.model_id!r})", "model",
                               status=404, kind="not_found_error")
        return body

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("x-api-key") or ""
        bearer = request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            given = given or bearer[7:]
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def handle(self, request: Request, flavour: str, fn: Callable) -> Response:
        """Run a route: the API key, then `fn(body)`, any refusal as the API's error body."""
        try:
            if not self.authorized(request):
                raise RequestError("invalid or missing API key", status=401, kind="authentication_error")
            return await fn(request, await self.body(request))
        except (RequestError, ValueError, TypeError) as e:
            status = getattr(e, "status", 400)
            kind = getattr(e, "kind", "invalid_request_error")
            return error_response(flavour, status, kind, str(e), getattr(e, "param", None))
        except Exception as e:  # a fault of ours: reported, and the server goes on
            return error_response(flavour, 500, "api_error", f"{type(e).__name__}: {e}")

    async def run(self, request: Request, messages: Any, kwargs: dict) -> tuple[Job, Any]:
        """Submit a job and wait for its first chunk (so that a request refused late, e.g. a prompt over the
        context, still gets its 4xx before any stream starts)."""
        job = self.engine.submit(messages, **dict(self.generation, **kwargs))
        stream = job.stream()
        try:
            first = await anext(stream)
        except BaseException:
            job.cancel()
            raise
        return job, (first, stream)

    async def gather(self, request: Request, job: Job, first: Any, stream: AsyncIterator) -> Reply:
        reply = Reply()
        reply.add(first)
        try:
            async for chunk in stream:
                reply.add(chunk)
                if await request.is_disconnected():
                    break
        finally:
            job.cancel()
        return reply

    # --- routes -----------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "queued": self.engine.pending,
                             "served": self.engine.served, "prompt_caches": len(self.engine.caches),
                             "prompt_cache_bytes": self.engine.cache_bytes})

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response("openai", 401, "authentication_error", "invalid or missing API key")
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                         "created": self.created, "owned_by": "mlx_qwen36"}]})

    async def chat(self, request: Request) -> Response:
        return await self.handle(request, "openai", self._chat)

    async def _chat(self, request: Request, body: dict) -> Response:
        messages, kwargs = openai.chat_request(body, self.media)
        job, (first, stream) = await self.run(request, messages, kwargs)
        if not body.get("stream"):
            return JSONResponse(openai.chat_response(await self.gather(request, job, first, stream), self.model_id))
        options = body.get("stream_options") or {}
        out = openai.ChatStream(self.model_id, bool(options.get("include_usage")))

        async def events() -> AsyncIterator[str]:
            yield sse(out.start())
            async for gen in _chain(first, stream):
                for chunk in out.chunks(gen):
                    yield sse(chunk)
            yield "data: [DONE]\n\n"

        return event_stream(job, events())

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "openai", self._completions)

    async def _completions(self, request: Request, body: dict) -> Response:
        ids, kwargs = openai.completion_request(body, self.engine.processor)
        job, (first, stream) = await self.run(request, ids, kwargs)
        cid, created = openai.completion_id("cmpl"), int(time.time())
        if not body.get("stream"):
            reply = await self.gather(request, job, first, stream)
            out = openai.completion_chunk(cid, created, self.model_id, "".join(reply.reasoning + reply.content),
                                          reply.finish)
            out["usage"] = reply.usage.openai()
            return JSONResponse(out)

        async def events() -> AsyncIterator[str]:
            async for gen in _chain(first, stream):
                if gen.text or gen.finish_reason:
                    yield sse(openai.completion_chunk(cid, created, self.model_id, gen.text, gen.finish_reason))
            yield "data: [DONE]\n\n"

        return event_stream(job, events())

    async def messages(self, request: Request) -> Response:
        return await self.handle(request, "anthropic", self._messages)

    async def _messages(self, request: Request, body: dict) -> Response:
        messages, kwargs = anthropic.messages_request(body, self.media)
        job, (first, stream) = await self.run(request, messages, kwargs)
        if not body.get("stream"):
            reply = await self.gather(request, job, first, stream)
            return JSONResponse(anthropic.message_response(reply, self.model_id))
        out = anthropic.MessageStream(self.model_id)

        async def events() -> AsyncIterator[str]:
            yield sse(out.start(first)[1], "message_start")
            async for gen in _chain(first, stream):
                for name, data in out.events(gen):
                    yield sse(data, name)

        return event_stream(job, events())

    async def count_tokens(self, request: Request) -> Response:
        return await self.handle(request, "anthropic", self._count_tokens)

    async def _count_tokens(self, request: Request, body: dict) -> Response:
        messages, tools, thinking = anthropic.count_request(body, self.media)
        ids = self.engine.processor.apply_chat_template(messages, tools=tools, enable_thinking=thinking,
                                                        preserve_thinking=True)
        return JSONResponse({"input_tokens": len(ids)})


def event_stream(job: Job, lines: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of `lines`; however it ends (done, or the client gone), the job is cancelled."""
    async def guarded() -> AsyncIterator[str]:
        try:
            async for line in lines:
                yield line
        finally:
            job.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream")


async def _chain(first: Any, rest: AsyncIterator) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_response(flavour: str, status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    if flavour == "anthropic":
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def parser() -> argparse.ArgumentParser:
    from .cli import add_model_argument, add_runtime_arguments

    p = argparse.ArgumentParser(prog="python -m mlx_qwen36.server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (localhost only by default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="required on every route but /health (Bearer or x-api-key)")
    p.add_argument("--allowed-local-media", type=Path, default=None, metavar="DIR",
                   help="let requests name image/video files under DIR (file:// or plain paths)")
    p.add_argument("--prompt-caches", type=int, default=4, help="conversations whose prompt cache is kept")
    p.add_argument("--prompt-cache-gb", type=float, default=8.0,
                   help="memory the kept prompt caches may take together (least recently used dropped first)")
    p.add_argument("--model-name", default=None, help="the model id clients must send (default: --model)")
    add_runtime_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from .cli import kv_kwargs, load_planned
    from .loader import load

    args = parser().parse_args(argv)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        model, processor = load_planned(args, load, vision=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, processor, max_caches=args.prompt_caches, max_cache_bytes=int(args.prompt_cache_gb * 1e9),
                    **kv_kwargs(args))
    server = Server(engine, args.model_name or args.model, api_key=args.api_key,
                    allowed_media=args.allowed_local_media,
                    generation={"draft_tokens": args.mtp} if args.mtp is not None else None)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
