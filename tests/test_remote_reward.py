"""The remote reward term against real local servers (`raftlm serve-reward`'s app on uvicorn),
concurrency of I/O-bound terms, context keywords, and scoring in journaled chunks."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from raftlm.config import RewardConfig, RewardTerm
from raftlm.data.prompts import PromptRecord
from raftlm.rewards.remote import RemoteReward
from raftlm.rewards.reward import Reward, RewardError, Term, build_reward, score
from raftlm.rewards.verifiable import numeric_answer
from raftlm.sampling.completion import Completion
from raftlm.tools.serve_reward import reward_app, serving

PROMPTS = ["What is 1 + 2?", [{"role": "user", "content": "2 + 2?"}]] * 5
COMPLETIONS = ["= 3", "4", "it is 3", "four", "3.0", "= 4", "x", "4", "3", "-4"]
ANSWERS = ["3", "4"] * 5


def remote(url: str, **settings) -> Reward:
    return Reward([("remote", 1.0, RemoteReward(url + "/score", **settings))])


def test_remote_scores_equal_the_function_in_process():
    local = Reward([("numeric_answer", 1.0, numeric_answer)])(
        PROMPTS, COMPLETIONS, {"answer": ANSWERS})
    with serving(reward_app(numeric_answer, "numeric_answer")) as url:
        result = remote(url, batch_size=3, concurrency=2)(PROMPTS, COMPLETIONS,
                                                          {"answer": ANSWERS})
    assert result.scores.tolist() == local.scores.tolist()
    assert local.scores.tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 1, 0]


def test_the_server_gets_columns_query_and_stage_and_passes_declared_ones_on():
    seen = []

    def curriculum(prompts, completions, answer, stage, prompt_texts, **columns):
        seen.append({"answer": answer, "stage": stage, "prompt_texts": prompt_texts})
        return [float(stage)] * len(completions)

    records = [PromptRecord(7, "Hi", "<user>Hi</user>", [1], {"answer": "5"})]
    completions = [[Completion("hello", [2], "eos"), Completion("yo", [3], "eos")]]
    with serving(reward_app(curriculum, "curriculum")) as url:
        result = score(remote(url), records, completions, stage=3)
    assert result.scores.tolist() == [3.0, 3.0]
    assert seen == [{"answer": ["5", "5"], "stage": 3,
                     "prompt_texts": ["<user>Hi</user>", "<user>Hi</user>"]}]


def recording_app(answer):
    """A server that keeps each request body and answers with `answer(body)`."""
    bodies = []

    async def handle(request):
        body = json.loads(await request.body())
        bodies.append(body)
        return await answer(body)

    return Starlette(routes=[Route("/score", handle, methods=["POST"])]), bodies


def test_request_carries_openrlhf_query_and_batches_of_batch_size():
    async def lengths(body):
        return JSONResponse({"rewards": [float(len(c)) for c in body["completions"]]})

    app, bodies = recording_app(lengths)
    records = [PromptRecord(i, f"p{i}", f"<p{i}>", [1], {}) for i in range(3)]
    completions = [[Completion(f"c{i}{j}", [2], "eos") for j in range(2)] for i in range(3)]
    with serving(app) as url:
        result = score(remote(url, batch_size=4), records, completions, stage=2, step=10)
    assert result.scores.tolist() == [3.0] * 6
    # The two batches are sent concurrently, so the server may see them in either order.
    bodies.sort(key=lambda b: -len(b["completions"]))
    assert [len(b["completions"]) for b in bodies] == [4, 2]
    assert bodies[0]["query"] == ["<p0>c00", "<p0>c01", "<p1>c10", "<p1>c11"]
    assert bodies[0]["prompts"] == ["p0", "p0", "p1", "p1"]
    assert bodies[1]["query"] == ["<p2>c20", "<p2>c21"]
    assert (bodies[0]["stage"], bodies[0]["step"], bodies[0]["columns"]) == (2, 10, {})


def test_requests_run_concurrently_up_to_the_limit():
    async def slow(body):
        await asyncio.sleep(0.2)
        return JSONResponse({"rewards": [0.0] * len(body["completions"])})

    app, _ = recording_app(slow)
    with serving(app) as url:
        times = {}
        for concurrency in (1, 4):
            start = time.perf_counter()
            remote(url, batch_size=1, concurrency=concurrency)(["p"] * 4, ["c"] * 4, {})
            times[concurrency] = time.perf_counter() - start
    assert times[1] > 0.75 and times[4] < 0.5, times


def test_an_outage_fails_every_batch_fast_with_one_line():
    async def unavailable(body):
        return JSONResponse({"detail": "overloaded"}, status_code=503)

    app, bodies = recording_app(unavailable)
    with serving(app) as url:
        start = time.perf_counter()
        with pytest.raises(RewardError) as err:
            remote(url, batch_size=1, concurrency=2, retry_s=1.0)(["p"] * 8, ["c"] * 8, {})
        took = time.perf_counter() - start
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"reward 'remote' POST {url}/score: HTTP ")
    assert "503" in message and "overloaded" in message and "gave up after" in message
    assert took < 2.5 and len(bodies) <= 6, (took, len(bodies))  # not 8 batches x retries


def test_skip_keeps_the_batches_that_were_scored():
    async def fails_on_bad(body):
        if "bad" in body["completions"]:
            return JSONResponse({"error": "cannot score"}, status_code=422)
        return JSONResponse({"rewards": [1.0] * len(body["completions"])})

    app, _ = recording_app(fails_on_bad)
    with serving(app) as url:
        reward = Reward([("remote", 1.0, RemoteReward(url + "/score", batch_size=2))],
                        on_error="skip")
        result = reward(["p"] * 6, ["a", "b", "bad", "c", "d", "e"], {})
    assert np.isnan(result.scores).tolist() == [False, False, True, True, False, False]
    assert result.n_invalid == 2


def test_on_scored_sees_each_chunk_of_whole_prompts_in_order():
    with serving(reward_app(numeric_answer, "numeric_answer")) as url:
        reward = remote(url, batch_size=2, concurrency=1)  # chunks of 2 * 1 * 4 = 8 candidates
        records = [PromptRecord(i, "p", "p", [1], {"answer": "3"}) for i in range(5)]
        completions = [[Completion(t, [1], "eos") for t in ("= 3", "2", "3")] for _ in range(5)]
        chunks = []
        result = score(reward, records, completions,
                       on_scored=lambda first, last, part: chunks.append(
                           (first, last, part.scores.tolist())))
    assert [(first, last) for first, last, _ in chunks] == [(0, 3), (3, 5)]
    assert chunks[0][2] == [1.0, 0.0, 1.0] * 3 and chunks[1][2] == [1.0, 0.0, 1.0] * 2
    assert result.scores.tolist() == [1.0, 0.0, 1.0] * 5


def test_build_reward_makes_a_remote_term_named_remote():
    reward = build_reward(RewardConfig(terms=[RewardTerm(url="http://127.0.0.1:1/score",
                                                         batch_size=8, concurrency=3)]))
    (term,) = reward.terms
    assert term.name == "remote" and term.is_async and not term.blame_items
    assert (term.fn.batch_size, term.fn.concurrency, term.fn.chunk_size) == (8, 3, 96)


# --- I/O-bound terms in process ---------------------------------------------------------------


async def sleepy(completions, **columns):
    await asyncio.sleep(0.3)
    return [1.0] * len(completions)


def test_async_terms_run_concurrently_with_each_other_and_with_plain_ones():
    def busy(completions, **columns):
        time.sleep(0.3)
        return [2.0] * len(completions)

    reward = Reward([("a", 1.0, sleepy), ("b", 1.0, sleepy), ("c", 1.0, busy)])
    start = time.perf_counter()
    result = reward(["p"], ["x"], {})
    assert time.perf_counter() - start < 0.55
    assert result.scores.tolist() == [4.0]


def test_an_async_term_that_overruns_its_timeout_fails_in_one_line():
    reward = Reward([Term("slow", 1.0, sleepy, timeout_s=0.05)])
    with pytest.raises(RewardError, match="^reward 'slow' timed out$"):
        reward(["p", "q"], ["x", "y"], {})


def test_stage_reaches_only_the_functions_that_declare_it():
    got = {}

    def with_stage(completions, stage, **columns):
        got["with"] = stage
        return [0.0] * len(completions)

    def without(completions, **columns):
        got["without"] = sorted(columns)
        return [0.0] * len(completions)

    records = [PromptRecord(0, "p", "p", [1], {"answer": "1"})]
    score(Reward([("a", 1.0, with_stage), ("b", 1.0, without)]), records,
          [[Completion("1", [1], "eos")]], stage=4)
    assert got == {"with": 4, "without": ["answer", "prompts"]}  # no stage


# --- `raftlm serve-reward` as its own process, and a run against it ---------------------------

SERVED = """
def digits(prompts, completions, answer, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""


@contextmanager
def serve_reward_process(spec: str) -> Iterator[str]:
    """`raftlm serve-reward --reward SPEC --port 0` in a subprocess; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "raftlm", "serve-reward", "--reward", spec, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"(http://\S+/score)", line)
        assert match, line + process.stdout.read()
        yield match.group(1)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_run_against_serve_reward_equals_the_run_in_process(tmp_path):
    from tiny import save_tiny_model

    from raftlm import RaftConfig, train

    model = save_tiny_model(tmp_path / "model")
    rows = [{"prompt": f"Say {i} digits", "answer": str(i)} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "served.py").write_text(SERVED)

    def run(name: str, term: dict) -> list[dict]:
        config = RaftConfig.from_dict({
            "run": {"output_dir": str(tmp_path / name), "seed": 3},
            "model": {"path": str(model), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
            "data": {"train_file": str(tmp_path / "train.jsonl")},
            "raft": {"stages": 1, "prompts_per_stage": 3, "samples_per_prompt": 3},
            "generation": {"max_new_tokens": 6},
            "reward": {"terms": [{**term, "label": "digits"}]},
            "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
            "evaluation": {"enabled": False}, "tracking": {"report": False},
        })
        train(config)
        return [json.loads(line) for stage in (1,) for line in
                (tmp_path / name / f"stages/{stage:03d}/candidates.jsonl").read_text().splitlines()]

    local = run("local", {"name": f"{tmp_path / 'served.py'}:digits"})
    with serve_reward_process(f"{tmp_path / 'served.py'}:digits") as url:
        served = run("served", {"url": url, "batch_size": 4})
    keys = ("prompt_id", "sample", "response", "reward", "selected")
    assert [{k: r[k] for k in keys} for r in served] == [{k: r[k] for k in keys} for r in local]
    assert len({r["reward"] for r in local}) > 1  # the rewards really differ between responses


def test_an_answer_does_not_wait_for_a_delayed_ack():
    """Without TCP_NODELAY on the served socket each answer took ~40 ms (Nagle against the
    client's delayed ACK): a stage of 256 one-completion requests lost 10 s to it."""
    import statistics

    import httpx

    with serving(reward_app(numeric_answer, "numeric_answer")) as url, httpx.Client() as client:
        times = []
        for _ in range(11):
            start = time.perf_counter()
            client.post(url + "/score", json={"prompts": ["p"], "completions": ["3"],
                                              "columns": {"answer": ["3"]}})
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.025, times


def test_a_served_reward_model_scores_like_the_local_one(tmp_path):
    from tiny import tiny_reward_model, tiny_tokenizer

    from raftlm.rewards.model import ModelReward
    from raftlm.tools.serve_reward import load_reward_spec

    tokenizer = tiny_tokenizer()
    tiny_reward_model(seed=0, vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    served_model = load_reward_spec(str(tmp_path), batch_size=2, device="cpu")
    assert isinstance(served_model, ModelReward)
    local = ModelReward(tmp_path, batch_size=2)(PROMPTS[:4], COMPLETIONS[:4])
    with serving(reward_app(served_model, str(tmp_path))) as url:
        remote_scores = remote(url, batch_size=2)(PROMPTS[:4], COMPLETIONS[:4], {}).scores
    assert remote_scores.tolist() == pytest.approx(local, abs=1e-6)
    assert len(set(local)) == 4
