"""The LLM-judge term against a real OpenAI-compatible server: `raftlm serve` answering with
raftlm's sampler on the tiny model. The grade is parsed from the text that server generated."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from tiny import save_tiny_model

from raftlm.config import JudgeConfig, RewardConfig, RewardTerm
from raftlm.rewards.judge import GRADE_PARSE, GRADE_RANGE, JudgeReward
from raftlm.rewards.reward import Reward, RewardError, build_reward
from raftlm.tools import serve_batching
from raftlm.tools.serve import openai_app
from raftlm.tools.serve_reward import serving
from raftlm.tools.target import load_target

TEMPLATE = "Grade this answer to '{prompt}' (reference {answer}): {completion}"
FIRST_DIGIT = r"(\d)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("judge") / "model")
    seeded = serve_batching.request_seed
    with pytest.MonkeyPatch.context() as patch:
        # A request without a seed samples afresh; these tests replay the judge's requests, so
        # the server answers each as if it had sent seed 0.
        patch.setattr(serve_batching, "request_seed", lambda seed: seeded(seed or 0))
        with serving(openai_app(load_target(str(folder)), "tiny-judge")) as url:
            yield url


def judge_config(url: str, **changes) -> JudgeConfig:
    settings = dict(base_url=url + "/v1", model="tiny-judge", template=TEMPLATE,
                    parse=FIRST_DIGIT, max_tokens=24, temperature=1.0)
    return JudgeConfig(**{**settings, **changes})


def test_the_server_answers_chat_completions_like_openai(server):
    models = httpx.get(server + "/v1/models").json()
    answer = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": "tiny-judge", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5, "n": 2}).json()
    assert models["data"][0]["id"] == "tiny-judge"
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["finish_reason"] in {"stop", "length"} for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] >= 1


def test_the_judge_grades_from_the_servers_generated_text(server):
    judge = JudgeReward(judge_config(server), concurrency=2)
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "Name a colour."}]]
    completions, answers = ["4", "blue"], ["4", "red"]
    scores = Reward([("judge", 1.0, judge)])(prompts, completions, {"answer": answers}).scores
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        asked = judge.messages(prompt, completion, {"answer": answers[i]})
        text = httpx.post(server + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-judge", "messages": asked, "max_tokens": 24, "temperature": 1.0,
        }).json()["choices"][0]["message"]["content"]
        assert scores[i] == float(re.search(FIRST_DIGIT, text).group(1)), text
    assert asked[0]["content"] == "Grade this answer to 'Name a colour.' (reference red): blue"


def test_an_answer_that_does_not_parse_names_term_item_and_answer(server):
    config = judge_config(server, parse=r"SCORE=(\d+)")
    with pytest.raises(RewardError, match=r"^reward 'judge' the judge's answer does not parse "
                                          r"with 'SCORE=\(\\\\d\+\)': '.+' \[item 0\] \(1 more"):
        Reward([("judge", 1.0, JudgeReward(config))])(["p", "q"], ["a", "b"], {"answer": [1, 2]})
    skipped = Reward([("judge", 1.0, JudgeReward(config))], on_error="skip")(
        ["p"], ["a"], {"answer": [1]})
    assert skipped.n_invalid == 1


def test_a_template_column_the_prompts_lack_is_reported_before_asking():
    reward = build_reward(RewardConfig(terms=[RewardTerm(judge=judge_config("http://127.0.0.1:9"))]))
    assert reward.terms[0].name == "judge"
    with pytest.raises(RewardError, match=r"reward 'judge' needs column\(s\) \['answer'\]"):
        reward(["p"], ["a"], {})


# --- the default grade: anchored to the answer, within the template's 0-10 --------------------


def answering(contents: list[str]) -> Starlette:
    """A chat-completions server answering the request for completion `i` with contents[i]."""

    async def chat(request):
        content = contents[int((await request.json())["messages"][-1]["content"])]
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": content}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_the_grade_is_the_whole_answer_within_the_range_not_a_number_inside_it():
    answers = ["7", "Score: 7.5", "8/10", "98 + 94 = ", "12", "I give it 8"]
    with serving(answering(answers)) as url:
        judge = JudgeReward(judge_config(url, template="{completion}", parse=GRADE_PARSE),
                            grade_range=GRADE_RANGE)
        result = Reward([("judge", 1.0, judge)], on_error="skip")(
            ["p"] * 6, [str(i) for i in range(6)], {})
        assert result.per_term["judge"][:3].tolist() == [7.0, 7.5, 8.0]
        assert np.isnan(result.per_term["judge"][3:]).all()
        with pytest.raises(RewardError, match=r"the judge's grade 12 is outside grade_range "
                                              r"\[0, 10\]: '12' \[item 0\]"):
            Reward([("judge", 1.0, judge)])(["p"], ["4"], {})


def test_the_configs_default_grade_is_anchored_and_range_checked():
    config = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m")
    assert config.parse == GRADE_PARSE
    term = build_reward(RewardConfig(terms=[RewardTerm(judge=config)])).terms[0].fn
    assert term.grade_range == GRADE_RANGE
