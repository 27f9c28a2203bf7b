"""`raftlm serve-reward --reward SPEC`: any reward term over HTTP, for `reward.terms[].url`.

SPEC is what a config term names: a built-in (`numeric_answer`), a function (`file.py:fn`,
`pkg.mod:fn`) or a reward-model folder. The server speaks the protocol of
`raftlm.rewards.remote` (docs/rewards.md) on uvicorn:

    POST /score   {"prompts", "completions", "columns", "query"?, "stage"?, "step"?}
                  or OpenRLHF's {"query", "prompts", "labels"}
                  -> 200 {"rewards": [...], "scores": [...]}; 400 for a malformed request; 422
                  when the reward raised or returned no list ({"error": "..."}: not retried)
    GET  /health  -> {"status": "ok", "reward": SPEC}

OpenRLHF's remote-RM client sends each `query` (templated prompt + response, special tokens
kept), `prompts` (the templated prompts) and `labels` (its `--label_key` column), and reads
`rewards` (and `scores`, for its dynamic filtering). Its request is served as `completions`: the
query after its prompt, less a trailing end-of-turn token; `prompts` and `prompt_texts`: the
templated prompts; the column `answer` (what raftlm's built-ins read): the labels. A reward
model scores each query whole instead, as OpenRLHF's `serve_rm` does.

`async def` rewards run concurrently; plain functions and models run in a worker thread,
`concurrency` calls at a time (1 by default: a model or a function that is not thread-safe).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raftlm.errors import InvalidInput
from raftlm.rewards.functions import CONTEXT_KEYWORDS, declared_keywords, is_async, resolve_function
from raftlm.rewards.model import ModelReward
from raftlm.rewards.terms import as_list, one_line


def load_reward_spec(spec: str, batch_size: int = 16, device: str = "auto"
                     ) -> Callable[..., Any]:
    """A reward-model folder (on `device`; auto: the GPU when there is one), a built-in's name
    or a `pkg.mod:fn` / `file.py:fn` spec."""
    if Path(spec).expanduser().is_dir():
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return ModelReward(Path(spec).expanduser(), batch_size).to(device)
    return resolve_function(spec)


def require_server_libraries() -> None:
    """Fail in one line when the `serve` extra (uvicorn, starlette) is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise InvalidInput(f"serving needs uvicorn and starlette ({err.name} is missing): "
                           "pip install 'raftlm[serve]'") from None


def reward_app(fn: Callable[..., Any], name: str, concurrency: int = 1) -> Any:
    """The ASGI app serving `fn` (Starlette)."""
    require_server_libraries()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    wants = declared_keywords(fn) & set(CONTEXT_KEYWORDS)
    slots = asyncio.Semaphore(concurrency) if concurrency else None

    async def score(request: Request) -> Response:
        try:
            data = json.loads(await request.body())
            kwargs = parse_request(data, wants)
        except ValueError as err:
            return JSONResponse({"error": f"bad request: {one_line(err)}"}, status_code=400)
        # A reward model asked by OpenRLHF scores each query whole, as OpenRLHF's own server
        # does: its prompts are already templated, and templating them again would be wrong.
        whole = getattr(fn, "score_texts", None) if is_openrlhf(data) else None
        call = (lambda: whole(data["query"])) if whole else (lambda: fn(**kwargs))
        try:
            if is_async(fn):
                output = await fn(**kwargs)
            else:
                async with slots:
                    output = await run_in_threadpool(call)
        except Exception as err:
            message = f"reward '{name}' raised {type(err).__name__}: {one_line(err)}"
            return JSONResponse({"error": message}, status_code=422)
        rewards = as_list(output)
        if rewards is None:
            return JSONResponse({"error": f"reward '{name}' returned a "
                                          f"{type(output).__name__}, not a list"}, status_code=422)
        # NaN travels as JSON's common extension `NaN`; the client names the item it is for.
        # `scores` repeats them for OpenRLHF's client, which filters on them.
        body = json.dumps({"rewards": rewards, "scores": rewards}, allow_nan=True,
                          default=_plain)
        return Response(body, media_type="application/json")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "reward": name})

    return Starlette(routes=[Route("/score", score, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


# The end-of-turn tokens a query may end with (OpenRLHF decodes with special tokens kept):
# <|im_end|>, <|eot_id|>, <|endoftext|>, </s>, <eos>, <end_of_turn>; several in a row.
END_OF_TURN = re.compile(r"(?:<\|[^<>|\s]+\|>|</s>|<eos>|<end_of_turn>)+\s*$")


def parse_request(data: Any, wants: set[str]) -> dict[str, Any]:
    """The reward's keyword arguments from a request body (raftlm's or OpenRLHF's shape);
    ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if is_openrlhf(data):
        data = _from_openrlhf(data)
    prompts, completions = data.get("prompts"), data.get("completions")
    columns = data.get("columns") or {}
    if not isinstance(completions, list) or not isinstance(prompts, list):
        raise ValueError("'prompts' and 'completions' must be lists (or send OpenRLHF's "
                         "'query', 'prompts' and 'labels')")
    if not isinstance(columns, dict):
        raise ValueError("'columns' must be an object of lists")
    n = len(completions)
    for key, values in {"prompts": prompts, **columns}.items():
        if not isinstance(values, list) or len(values) != n:
            raise ValueError(f"'{key}' must be a list of {n} entries, one per completion")
    kwargs = {"prompts": prompts, "completions": completions, **columns}
    query = data.get("query")
    queries = query if isinstance(query, list) and len(query) == n else None
    if "queries" in wants:
        kwargs["queries"] = queries
    if "prompt_texts" in wants:  # the query less its completion; None when not sent
        kwargs["prompt_texts"] = data.get("prompt_texts") or (
            None if queries is None else [_prompt_text(q, c) for q, c in zip(queries, completions)])
    for key in ("stage", "step"):
        if key in wants:
            kwargs[key] = data.get(key)
    return kwargs


def is_openrlhf(data: Any) -> bool:
    """Whether a request body has OpenRLHF's shape ({query, prompts, labels})."""
    return isinstance(data, dict) and "completions" not in data and "query" in data


def _from_openrlhf(data: dict[str, Any]) -> dict[str, Any]:
    """OpenRLHF's {query, prompts, labels} as raftlm's request."""
    queries, prompts, labels = data["query"], data.get("prompts"), data.get("labels")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("'query' must be a list of strings")
    if prompts is None:  # OpenRLHF's older client sends the queries alone
        raise ValueError("'query' without 'prompts': the completion cannot be told from its "
                         "prompt; send OpenRLHF's 'prompts' too")
    if not isinstance(prompts, list) or len(prompts) != len(queries):
        raise ValueError(f"'prompts' must be a list of {len(queries)} strings, one per query")
    completions = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        if not isinstance(prompt, str) or not query.startswith(prompt):
            raise ValueError(f"'query'[{i}] does not start with 'prompts'[{i}]")
        completions.append(END_OF_TURN.sub("", query[len(prompt):]))
    columns = {} if labels is None else {"answer": labels}
    return {"prompts": prompts, "completions": completions, "columns": columns,
            "query": queries, "prompt_texts": prompts}


def _prompt_text(query: str, completion: str) -> str:
    """The prompt as the policy saw it: the query less its end-of-turn token and completion."""
    for body in (END_OF_TURN.sub("", query), query):
        if body.endswith(completion):
            return body[: len(body) - len(completion)]
    return query


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every answer waits ~40 ms (Nagle against the client's delayed ACK).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve_forever(app: Any, sock: socket.socket) -> None:
    """Serve `app` on `sock` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


@contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` in a background thread for the `with` block; yields http://host:port."""
    import uvicorn

    sock = bind(host, port)
    # A request still running at the end of the block gets a second, not the default forever.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
