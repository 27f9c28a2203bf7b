"""raftlm's reward protocol next to OpenRLHF's: `raftlm serve-reward` answers OpenRLHF's
remote-RM client (its exact request), raftlm's `query` ends with the end-of-turn token as
OpenRLHF's does, and `step` reaches the terms and the payload."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from tiny import tiny_reward_model, tiny_tokenizer

from raftlm.data.prompts import PromptRecord
from raftlm.rewards.remote import RemoteReward
from raftlm.rewards.reward import Reward, score
from raftlm.rewards.verifiable import numeric_answer
from raftlm.sampling.completion import Completion
from raftlm.tools.serve_reward import load_reward_spec, reward_app, serving

# What OpenRLHF's remote-RM client posts (openrlhf/utils/remote_rm_utils.py, `remote_rm_fn_ray`:
# request_api_wrapper(url, {"query": queries, "prompts": prompts, "labels": labels})): each
# query is the prompt and response token ids decoded with skip_special_tokens=False, so it ends
# with the end-of-turn token; prompts are the chat-templated prompts; labels the label column.
PROMPTS = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n<|im_start|>assistant\n"]
OPENRLHF_REQUEST = {
    "query": [PROMPTS[0] + "2 + 2 = 4<|im_end|>", PROMPTS[1] + "It is 9.<|im_end|><|endoftext|>"],
    "prompts": PROMPTS,
    "labels": ["4", "8"],
}


def request_api_wrapper(url: str, data: dict, score_key: str = "rewards") -> list:
    """OpenRLHF's client, as it reads an answer: raise_for_status, then `score_key`."""
    response = httpx.post(url, json=data, headers={"Content-Type": "application/json"},
                          timeout=180)
    response.raise_for_status()
    answer = response.json()
    assert score_key in answer, f"{score_key} not in {answer}"
    return answer[score_key]


def test_serve_reward_answers_openrlhfs_remote_rm_client():
    with serving(reward_app(numeric_answer, "numeric_answer")) as url:
        rewards = request_api_wrapper(url + "/score", OPENRLHF_REQUEST)
        scores = request_api_wrapper(url + "/score", OPENRLHF_REQUEST, "scores")
    assert rewards == [1.0, 0.0]
    assert scores == rewards  # OpenRLHF's dynamic filtering reads `scores`


def test_an_openrlhf_request_reaches_the_reward_as_completions_columns_and_prompt_texts():
    seen = {}

    def record(prompts, completions, answer, prompt_texts, queries, **columns):
        seen.update(completions=completions, answer=answer, prompt_texts=prompt_texts,
                    queries=queries)
        return [0.0] * len(completions)

    with serving(reward_app(record, "record")) as url:
        request_api_wrapper(url + "/score", OPENRLHF_REQUEST)
    assert seen == {"completions": ["2 + 2 = 4", "It is 9."], "answer": ["4", "8"],
                    "prompt_texts": PROMPTS, "queries": OPENRLHF_REQUEST["query"]}


def test_an_openrlhf_query_that_does_not_start_with_its_prompt_is_a_400_naming_it():
    bad = {**OPENRLHF_REQUEST, "prompts": [PROMPTS[0], "something else"]}
    with serving(reward_app(numeric_answer, "numeric_answer")) as url:
        answer = httpx.post(url + "/score", json=bad)
    assert answer.status_code == 400
    assert "'query'[1] does not start with 'prompts'[1]" in answer.json()["error"]


def recording_server():
    bodies = []

    async def handle(request):
        bodies.append(json.loads(await request.body()))
        return JSONResponse({"rewards": [0.5] * len(bodies[-1]["completions"])})

    return Starlette(routes=[Route("/score", handle, methods=["POST"])]), bodies


def records_and_completions(tok):
    record = PromptRecord(0, "Hi", "<user>Hi</user>", [1], {"answer": "5"})
    eos = tok.eos_token_id
    completions = [Completion("ab", tok.encode("ab") + [eos], "eos"),  # stopped on eos
                   Completion("cd", tok.encode("cd"), "length")]  # cut: no end token
    return [record], [completions]


def score_remotely(url: str) -> None:
    """Score `records_and_completions` with a url term, the policy's tokenizer given."""
    tok = tiny_tokenizer()
    records, completions = records_and_completions(tok)
    score(Reward([("rm", 1.0, RemoteReward(url + "/score"))]), records, completions,
          tokenizer=tok)


def test_the_query_ends_with_the_end_of_turn_token_the_completion_stopped_on():
    app, bodies = recording_server()
    with serving(app) as url:
        score_remotely(url)
    assert bodies[0]["query"] == ["<user>Hi</user>ab<|im_end|>", "<user>Hi</user>cd"]


def test_serve_reward_tells_the_prompt_text_from_a_query_with_its_end_token():
    seen = []

    def texts(completions, prompt_texts, **columns):
        seen.extend(prompt_texts)
        return [0.0] * len(completions)

    with serving(reward_app(texts, "texts")) as url:
        score_remotely(url)
    assert seen == ["<user>Hi</user>", "<user>Hi</user>"]


def test_step_reaches_the_functions_that_declare_it_and_the_payload():
    steps = []

    def by_step(completions, step, **columns):
        steps.append(step)
        return [float(step)] * len(completions)

    tok = tiny_tokenizer()
    app, bodies = recording_server()
    records, completions = records_and_completions(tok)
    with serving(app) as url:
        reward = Reward([("fn", 1.0, by_step), ("rm", 1.0, RemoteReward(url + "/score"))])
        result = score(reward, records, completions, stage=3, step=40)
    assert steps == [40]
    assert bodies[0]["step"] == 40 and bodies[0]["stage"] == 3
    assert result.per_term["fn"].tolist() == [40.0, 40.0]


def test_a_served_reward_model_scores_openrlhfs_queries_whole_as_its_server_does(tmp_path):
    tok = tiny_tokenizer()
    tiny_reward_model(seed=0, vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = load_reward_spec(str(tmp_path), batch_size=2, device="cpu")
    # OpenRLHF's serve_rm: tokenizer(queries, add_special_tokens=False, padding=True).
    expected = rm.score_texts(OPENRLHF_REQUEST["query"])
    templated_again = rm(PROMPTS, ["2 + 2 = 4", "It is 9."])  # its template around theirs
    with serving(reward_app(rm, str(tmp_path))) as url:
        rewards = request_api_wrapper(url + "/score", OPENRLHF_REQUEST)
    assert rewards == pytest.approx(expected, abs=1e-6)
    assert rewards != pytest.approx(templated_again, abs=1e-6)
