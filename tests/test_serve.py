"""`raftlm serve` against the official `openai` client: a real server on 127.0.0.1 (a free
port) serving the tiny random model, started and stopped by this module."""

from __future__ import annotations

import dataclasses
import threading

import httpx
import openai
import pytest
from tiny import save_tiny_model

from raftlm.data.prompts import render_chat
from raftlm.tools import serve
from raftlm.tools.serve import openai_app
from raftlm.tools.serve_api import parse_chat_request
from raftlm.tools.serve_batching import Batcher, Job
from raftlm.tools.serve_reward import serving
from raftlm.tools.target import load_target

NAME = "tiny-served"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("serve") / "model")
    app = openai_app(load_target(str(folder)), NAME)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, **settings):
    return client.chat.completions.create(model=NAME, messages=HI, **settings)


def test_repeated_requests_without_a_seed_sample_afresh(client):
    answers = {ask(client, max_tokens=16).choices[0].message.content for _ in range(3)}
    assert len(answers) == 3


def test_requests_with_a_seed_are_reproducible(client):
    first, second = (ask(client, max_tokens=16, seed=7) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


def test_the_stop_string_is_not_part_of_the_content(client):
    text = ask(client, max_tokens=24, seed=3).choices[0].message.content
    stop = text[4]
    stopped = ask(client, max_tokens=24, seed=3, stop=[stop]).choices[0]
    assert stopped.message.content == text[: text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_max_completion_tokens_is_honoured_over_max_tokens(client):
    answer = ask(client, max_completion_tokens=2, max_tokens=40, seed=1)
    assert answer.usage.completion_tokens <= 2
    assert answer.choices[0].finish_reason in {"length", "stop"}


def test_text_content_parts_read_as_their_text(client):
    parts = client.chat.completions.create(
        model=NAME, max_tokens=8, seed=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "H"},
                                               {"type": "text", "text": "i"}]}])
    plain = ask(client, max_tokens=8, seed=5)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_null_fields_mean_not_given(url):
    answer = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": None, "messages": HI + [{"role": "assistant", "content": None},
                                         {"role": "user", "content": "ok"}],
        "max_tokens": None, "temperature": None, "top_p": None, "n": None, "stop": None,
        "seed": None, "stream": None, "stream_options": None, "logprobs": None})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == NAME


@pytest.mark.parametrize(("field", "value", "says"), [
    ("max_tokens", -1, "'max_tokens' must be >= 1, got -1"),
    ("max_completion_tokens", 0, "'max_completion_tokens' must be >= 1, got 0"),
    ("max_tokens", 2.5, "'max_tokens' must be an integer"),
    ("temperature", 3, "'temperature' must be in [0, 2], got 3"),
    ("top_p", 0, "'top_p' must be in (0, 1], got 0"),
    ("n", 0, "'n' must be in [1, 128], got 0"),
    ("stop", [""], "'stop' must be a non-empty string"),
    ("logprobs", True, "'logprobs' is not supported"),
    ("presence_penalty", 0.5, "'presence_penalty' is not supported"),
])
def test_invalid_values_are_refused_with_400_naming_the_field(client, field, value, says):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, extra_body={field: value})
    assert refused.value.status_code == 400
    assert says in refused.value.body["message"]
    assert refused.value.body["param"] == field


def test_non_text_content_parts_are_refused_with_400(client):
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}])


def test_a_body_that_is_not_json_gets_a_json_400(url):
    answer = httpx.post(url + "/v1/chat/completions", content=b"{", timeout=60)
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]["message"]


def test_streaming_sends_chunks_that_add_up_to_the_answer(client):
    whole = ask(client, max_tokens=24, seed=11, n=2)
    chunks = list(ask(client, max_tokens=24, seed=11, n=2, stream=True,
                      stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    for j in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == j]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[j].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [
            whole.choices[j].finish_reason]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 4
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_streamed_answer_never_shows_its_stop_string(client):
    text = ask(client, max_tokens=24, seed=3).choices[0].message.content
    stop = text[4:6]
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(
        client, max_tokens=24, seed=3, stop=stop, stream=True) if c.choices)
    assert streamed == text[: text.index(stop)]


def test_on_the_hf_backend_a_stream_sends_each_answer_whole_at_its_end(tiny_model_dir):
    target = load_target(str(tiny_model_dir))
    target.config.generation = dataclasses.replace(target.config.generation, backend="hf")
    with serving(openai_app(target, NAME)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        whole = ask(client, max_tokens=12, seed=4).choices[0].message.content
        chunks = [c.choices[0] for c in ask(client, max_tokens=12, seed=4, stream=True)
                  if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == whole
    assert chunks[-1].finish_reason in {"stop", "length"}


def test_a_stream_ends_with_done_as_server_sent_events(url):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "messages": HI, "max_tokens": 4, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_concurrent_requests_share_sampler_calls_and_keep_their_answers(client, served):
    batcher = served[1].state.batcher
    alone = [ask(client, max_tokens=12, seed=s).choices[0].message.content for s in range(8)]
    answers: dict[int, str] = {}

    def request(seed: int) -> None:
        answers[seed] = ask(client, max_tokens=12, seed=seed).choices[0].message.content

    calls = batcher.calls
    # A long request keeps the sampler busy while the eight others queue behind it.
    busy = threading.Thread(target=ask, args=(client,), kwargs=dict(max_tokens=400))
    busy.start()
    threads = [threading.Thread(target=request, args=(s,)) for s in range(8)]
    for thread in [*threads]:
        thread.start()
    for thread in [busy, *threads]:
        thread.join()
    assert [answers[s] for s in range(8)] == alone
    assert batcher.calls - calls < 1 + 8


def test_a_request_joins_the_sampler_call_already_running(client, served):
    batcher = served[1].state.batcher
    settings = dict(max_tokens=200, temperature=1.0)
    alone = ask(client, seed=5, **settings).choices[0].message.content
    calls = batcher.calls
    running = iter(ask(client, seed=6, n=8, stream=True, **settings))
    while not next(running).choices[0].delta.content:
        pass  # until the running call has decoded a token
    joined = ask(client, seed=5, **settings).choices[0].message.content
    rest = list(running)
    assert joined == alone
    assert batcher.calls - calls == 1
    assert rest[-1].choices[0].finish_reason  # the running call went on after it


def test_requests_queued_together_take_one_sampler_call_per_setting(tiny_model_dir):
    target = load_target(str(tiny_model_dir))
    _, prompt_ids = render_chat(HI, target.tokenizer)
    batcher = Batcher(target)

    def job(seed: int, **changes) -> Job:
        body = {"messages": HI, "max_tokens": 4, "seed": seed, **changes}
        return Job(parse_chat_request(body), prompt_ids)

    with batcher.changed:  # the sampler's thread takes the queue only once all five are in
        futures = [batcher.submit(job(seed)) for seed in range(4)]
        futures.append(batcher.submit(job(9, temperature=0.5)))
    assert all(len(future.result(timeout=120)) == 1 for future in futures)
    batcher.close()
    assert batcher.calls == 2


def test_models_list_entries_have_created_and_retrieve_works(client):
    (entry,) = client.models.list().data
    assert entry.id == NAME and isinstance(entry.created, int) and entry.created > 0
    assert client.models.retrieve(NAME).id == NAME


def test_an_unknown_model_gets_404_like_openai(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-9", messages=HI)
    assert refused.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/completions", 404), ("GET", "/v1/nothing", 404),
    ("GET", "/v1/chat/completions", 405)])
def test_unsupported_paths_answer_openais_json_error(url, method, path, status):
    answer = httpx.request(method, url + path, json={"prompt": "Hi"}, timeout=60)
    assert answer.status_code == status
    assert answer.json()["error"]["message"]
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_an_internal_error_answers_500_in_openais_shape(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serve, "render_chat", broken)
    with pytest.raises(openai.InternalServerError) as failed:
        ask(client)
    assert failed.value.body["message"] == "internal error: RuntimeError: boom"


def test_legacy_completions_are_refused_through_the_client(client):
    with pytest.raises(openai.NotFoundError, match="chat completions only"):
        client.completions.create(model=NAME, prompt="Hi")
