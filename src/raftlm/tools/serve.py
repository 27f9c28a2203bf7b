"""`raftlm serve RUN_DIR|MODEL`: a run's policy (or a model) behind an OpenAI-compatible API.

Every client that speaks OpenAI's chat-completions API (the `openai` package, LLM-judge terms,
evaluation harnesses, chat UIs) can then talk to the aligned model. Replies come from raftlm's
sampler with the training chat template and system prompt:

    POST /v1/chat/completions  {"model"?, "messages": [...], "max_completion_tokens"? (or
                                "max_tokens"), "temperature"? (0 = greedy), "top_p"?, "n"?,
                                "seed"?, "stop"?, "stream"?, "stream_options"?, "tools"?,
                                "tool_choice"?}
    GET  /v1/models            the one model served;  GET /v1/models/{id}
    GET  /health

What a request may hold and how it is checked: `serve_api.py`. `"stream": true` answers
Server-Sent Events of `chat.completion.chunk`s ending with `data: [DONE]`, token by token on
the raftlm backend. Concurrent requests share the sampler's batch (`serve_batching.py`).
Without a `seed` every request samples afresh; with one it is reproducible. Errors, unknown
paths and unknown models answer OpenAI's `{"error": {...}}` JSON (400, 404, 405, 500).
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from raftlm.data.prompts import render_chat
from raftlm.tools.serve_api import (
    ChatRequest,
    RequestError,
    chunk,
    completion_body,
    delta,
    error_body,
    last_deltas,
    new_id,
    parse_chat_request,
    streamed_text,
    usage,
)
from raftlm.tools.serve_batching import Batcher, Job
from raftlm.tools.serve_tools import tool_prompt
from raftlm.tools.target import Target


def openai_app(target: Target, name: str, max_batch_requests: int = 256) -> Any:
    """The ASGI app (Starlette) serving `target` as model `name`; at most
    `max_batch_requests` queued requests share one sampler call (1: one at a time)."""
    from raftlm.tools.serve_reward import require_server_libraries

    require_server_libraries()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    batcher = Batcher(target, max_batch_requests)
    created = int(time.time())
    model_card = {"id": name, "object": "model", "created": created, "owned_by": "raftlm"}

    def failure(err: RequestError) -> Response:
        return JSONResponse(err.body(), status_code=err.status)

    async def completions(request: Request) -> Response:
        try:
            return await answer(request)
        except Exception as exc:  # a bug: answered here, so the client's connection stays
            # open (an exception left to Starlette is re-raised and uvicorn drops the
            # connection under a client that keeps it alive, e.g. the openai package's pool)
            traceback.print_exc()
            return await crashed(request, exc)

    async def answer(request: Request) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as err:
                raise RequestError(f"the request body is not valid JSON: {err}") from None
            chat = parse_chat_request(body)
            if chat.model is not None and chat.model != name:
                raise RequestError(f"The model '{chat.model}' does not exist (this server "
                                   f"serves '{name}')", "model", 404, "model_not_found")
            try:
                if chat.tools:  # shown as rollouts show them, a forced call's opening after
                    prompt_ids = tool_prompt(target.tokenizer, chat.messages,
                                             target.config.data.system_prompt, chat.tools,
                                             chat.tool_choice)
                else:
                    _, prompt_ids = render_chat(chat.messages, target.tokenizer,
                                                target.config.data.system_prompt)
            except ValueError as err:  # e.g. a chat template that refuses the roles' order
                raise RequestError(f"'messages': {err}", "messages") from None
        except RequestError as err:
            return failure(err)
        if chat.stream:
            return StreamingResponse(_events(batcher, target, name, chat, prompt_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        job = Job(chat, prompt_ids)
        try:
            completions = await asyncio.wrap_future(batcher.submit(job))
        except Exception as err:  # the sampler failed: the client gets it, the server goes on
            return JSONResponse(error_body(f"sampling failed: {err}", kind="server_error"),
                                status_code=500)
        return JSONResponse(completion_body(chat, name, completions, len(prompt_ids)))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request) -> Response:
        asked = request.path_params["model"]
        if asked != name:
            return failure(RequestError(f"The model '{asked}' does not exist (this server "
                                        f"serves '{name}')", "model", 404, "model_not_found"))
        return JSONResponse(model_card)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": name})

    async def legacy_completions(request: Request) -> Response:
        # Read the body first: a kept-alive connection whose request body is left unread is
        # closed under the client, which then sees a reset instead of this 404.
        await request.body()
        return failure(RequestError("raftlm serve answers chat completions only: POST "
                                    "/v1/chat/completions", status=404, code="unknown_url"))

    async def unknown(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (f"Invalid URL ({request.method} {request.url.path})" if status == 404
                   else f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(error_body(message), status_code=status)

    async def crashed(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault; still OpenAI's shape, so clients show the message.
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       kind="server_error"), status_code=500)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batcher.close)  # lets the sampler finish its call

    app = Starlette(
        routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{model:path}", model, methods=["GET"]),
                Route("/v1/completions", legacy_completions, methods=["POST"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={404: unknown, 405: unknown, Exception: crashed}, lifespan=lifespan)
    app.state.batcher = batcher
    return app


async def _events(batcher: Batcher, target: Target, name: str, chat: ChatRequest,
                  prompt_ids: list[int]) -> AsyncIterator[str]:
    """The Server-Sent Events of a streamed request: a role chunk per choice, text chunks as
    the sampler decodes, a finish chunk per choice, the usage if asked, then [DONE]."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
    job = Job(chat, prompt_ids, on_token=lambda j, ids: loop.call_soon_threadsafe(
        tokens.put_nowait, (j, ids)))
    chunk_id, created = new_id(), int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps(chunk(chunk_id, name, created, choices, **extra))}\n\n"

    texts = [streamed_text(target.tokenizer, chat) for _ in range(chat.n)]
    for j in range(chat.n):
        yield event([delta(j, content="", role="assistant")])
    result = batcher.submit(job)
    done = asyncio.wrap_future(result)
    while not done.done() or not tokens.empty():
        getting = asyncio.ensure_future(tokens.get())
        await asyncio.wait({getting, done}, return_when=asyncio.FIRST_COMPLETED)
        if not getting.done():
            getting.cancel()
            continue
        j, ids = getting.result()
        new = texts[j].update(ids)
        if new:
            yield event([delta(j, content=new)])
    try:
        completions = done.result()
    except Exception as err:  # headers are sent: the error travels as an event
        yield f"data: {json.dumps(error_body(f'sampling failed: {err}', kind='server_error'))}\n\n"
        return
    for j, completion in enumerate(completions):
        for last in last_deltas(j, texts[j], completion, chat):
            yield event([last])
    if chat.include_usage:
        yield event([], usage=usage(len(prompt_ids), completions))
    yield "data: [DONE]\n\n"


def served_name(target: Target, path: str) -> str:
    """The model's name in the API: the run directory's name (and stage) or the model path."""
    if target.run_dir is None:
        return str(path)
    return f"{target.run_dir.name}@stage{target.stage}"
