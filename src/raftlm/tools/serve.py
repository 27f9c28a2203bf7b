"""`raftlm serve RUN_DIR|MODEL`: a run's policy (or a model) behind an OpenAI-compatible API.

Every client that speaks OpenAI's chat-completions API (the `openai` package, LLM-judge terms,
evaluation harnesses) can then talk to the aligned model. Replies come from raftlm's sampler
with the training chat template and system prompt, one request at a time:

    POST /v1/chat/completions  {"messages": [...], "max_tokens"?, "temperature"? (0 = greedy),
                                "top_p"?, "n"?, "seed"?, "stop"?}
    GET  /v1/models            the one model served
    GET  /health

Streaming is not supported (`"stream": true` is refused).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from typing import Any

from raftlm.data.prompts import render_chat
from raftlm.sampling.generate import generate, sample_seeds
from raftlm.tools.target import Target

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length"}


def chat_completion(target: Target, name: str, request: Any) -> dict[str, Any]:
    """The answer to one chat-completions request; ValueError for a malformed one."""
    if not isinstance(request, dict):
        raise ValueError(f"expected a JSON object, got {type(request).__name__}")
    if request.get("stream"):
        raise ValueError("streaming is not supported; send \"stream\": false")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    temperature = float(request.get("temperature", 1.0))
    n, seed = int(request.get("n", 1)), int(request.get("seed", 0))
    if temperature < 0 or n < 1:
        raise ValueError("'temperature' must be >= 0 and 'n' >= 1")
    stop = request.get("stop") or []
    settings = dataclasses.replace(
        target.config.generation,
        max_new_tokens=int(request.get("max_tokens") or target.config.generation.max_new_tokens),
        temperature=temperature or 1.0, top_p=float(request.get("top_p", 1.0)), top_k=0,
        stop_strings=[stop] if isinstance(stop, str) else list(stop),
    )
    _, prompt_ids = render_chat(messages, target.tokenizer, target.config.data.system_prompt)
    completions = generate(target.model, target.tokenizer, [prompt_ids], n, settings,
                           seeds=sample_seeds(seed, 0, [0]), greedy=temperature == 0,
                           desc="serve")[0]
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(time.time()), "model": request.get("model") or name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": FINISH_REASONS.get(c.finish_reason, "stop")}
                    for i, c in enumerate(completions)],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": tokens,
                  "total_tokens": len(prompt_ids) + tokens},
    }


def openai_app(target: Target, name: str) -> Any:
    """The ASGI app (Starlette) serving `target` as model `name`."""
    from raftlm.tools.serve_reward import require_server_libraries

    require_server_libraries()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    one_at_a_time = threading.Lock()  # one model, one sampler: requests take turns

    def answer(request: Any) -> dict[str, Any]:
        with one_at_a_time:
            return chat_completion(target, name, request)

    async def completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            return JSONResponse(await run_in_threadpool(answer, body))
        except (ValueError, TypeError) as err:  # malformed JSON, fields, messages
            error = {"message": str(err), "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=400)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "raftlm"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": name})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


def served_name(target: Target, path: str) -> str:
    """The model's name in the API: the run directory's name (and stage) or the model path."""
    if target.run_dir is None:
        return str(path)
    return f"{target.run_dir.name}@stage{target.stage}"
