"""generation.teacher (raftlm.sampling.teacher) on tiny models: a local teacher and a real
OpenAI-compatible server (raftlm's own `serve`, on 127.0.0.1) sample the last share of each
prompt's K, tagged `source`; the policy's samples are those it draws anyway; exact resume; two
processes agree with one."""


import pytest
from test_collectors import stage_rows
from test_hints import in_two_processes, killed_and_resumed
from test_loop import REWARD_FILE, make_config
from test_resume import snapshot
from tiny import assert_same_run, save_tiny_bpe_model, save_tiny_model, write_digits_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from raftlm import RaftConfig, train
from raftlm.config import ConfigError, GenerationConfig
from raftlm.data.prompts import render_chat
from raftlm.sampling.generate import generate
from raftlm.sampling.teacher import TeacherFailed, check_teacher, teacher_seeds
from raftlm.tools.serve import openai_app
from raftlm.tools.serve_reward import serving
from raftlm.tools.target import load_target

SERVED = "tiny-teacher"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Another tiny model with the policy's tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), seed=1)


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    write_digits_task(tmp_path, REWARD_FILE)
    return tmp_path


def config(workspace, model_dir, teacher: dict, **sections) -> RaftConfig:
    sections = {key: dict(value) for key, value in sections.items()}
    sections.setdefault("generation", {})["teacher"] = {"share": 0.34, **teacher}
    return make_config(workspace, model_dir, tracking={"report": False}, **sections)


def test_the_teacher_samples_the_last_share_of_k_and_the_policy_what_it_samples_anyway(
        workspace, tiny_model_dir, teacher_dir):
    alone = stage_rows(train(make_config(workspace, tiny_model_dir, raft={"stages": 1}, run={
        "output_dir": str(workspace / "alone")}, tracking={"report": False})).run_dir, 1)
    taught = stage_rows(train(config(workspace, tiny_model_dir, {"model": str(teacher_dir)},
                                     raft={"stages": 1})).run_dir, 1)
    assert [r.get("source") for r in taught] == [None, None, str(teacher_dir)] * 4  # K=3, 1
    assert [r["response"] for r in taught if r["sample"] < 2] == [
        r["response"] for r in alone if r["sample"] < 2]
    # Sample j of the teacher depends on (run seed, stage, prompt id, j) alone.
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    rows = [r for r in taught if r.get("source")]
    direct = generate(model, tok, [render_chat(r["original_prompt"], tok)[1] for r in rows], 1,
                      GenerationConfig(max_new_tokens=6, batch_size=8),
                      seeds=teacher_seeds(1, 1, [r["prompt_id"] for r in rows]))
    assert [row[0].text for row in direct] == [r["response"] for r in rows]


def test_a_ratio_objective_gets_no_sampler_log_probs_for_teacher_samples(
        workspace, tiny_model_dir, teacher_dir, monkeypatch):
    import raftlm.stage.loop

    recorded, original = [], raftlm.stage.loop.rank
    monkeypatch.setattr(raftlm.stage.loop, "rank", lambda rollouts, *args: (
        recorded.extend((r.source, r.token_log_probs is None) for row in rollouts.responses
                        for r in row), original(rollouts, *args))[1])
    result = train(config(workspace, tiny_model_dir, {"model": str(teacher_dir)},
                          training={"objective": "grpo"}, raft={"stages": 1}))
    assert set(recorded) == {(None, False), (str(teacher_dir), True)}
    assert result.metrics[1]["train/n_examples"] > 0  # pi_old from the policy: it trained


def test_a_local_teacher_with_another_tokenizer_is_refused(workspace, tiny_model_dir,
                                                           tmp_path):
    other = save_tiny_bpe_model(tmp_path / "bpe")
    with pytest.raises(ConfigError, match="generation.teacher.model: .* tokenizer is not the "
                                          "policy's"):
        train(config(workspace, tiny_model_dir, {"model": str(other)}, raft={"stages": 1}))


def test_teacher_settings_that_cannot_work_are_refused(workspace, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"generation.teacher.share: expected in \(0, 1\]"):
        config(workspace, tiny_model_dir, {"model": "x", "share": 0})
    with pytest.raises(ConfigError, match="generation.teacher.model: expected a model path"):
        config(workspace, tiny_model_dir, {"base_url": "http://127.0.0.1:1/v1"})
    with pytest.raises(ConfigError, match="generation.teacher: expected a generation.backend "
                                          "whose samples depend on"):
        check_teacher(config(workspace, tiny_model_dir, {"model": "x"},
                             generation={"backend": "hf"}))


def test_an_openai_compatible_server_teaches_as_reproducibly_as_it_samples(
        workspace, tiny_model_dir, teacher_dir):
    with serving(openai_app(load_target(str(teacher_dir)), SERVED)) as url:
        runs = [stage_rows(train(config(workspace, tiny_model_dir, {
            "model": SERVED, "base_url": f"{url}/v1"}, raft={"stages": 1}, run={
            "output_dir": str(workspace / name)})).run_dir, 1) for name in ("a", "b")]
    assert runs[0] == runs[1]  # seeded requests: the same samples
    taught = [r for r in runs[0] if r.get("source") == SERVED]
    assert [r["sample"] for r in taught] == [2] * 4
    assert all(r["n_tokens"] <= 6 for r in taught)
    assert {r["finish_reason"] for r in taught} <= {"eos", "length"}


def test_a_teacher_server_that_is_down_stops_the_stage_in_one_line(workspace, tiny_model_dir):
    import socket

    with socket.socket() as free:  # a port nobody listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(TeacherFailed, match=f"generation.teacher: POST http://127.0.0.1:{port}"
                                            "/v1/chat/completions: .* samples failed"):
        train(config(workspace, tiny_model_dir, {"model": SERVED, "timeout_s": 1,
                                                 "base_url": f"http://127.0.0.1:{port}/v1"}))


def test_a_stage_killed_among_teacher_samples_resumes_to_the_identical_run(
        workspace, tiny_model_dir, teacher_dir, monkeypatch):
    taught = config(workspace, tiny_model_dir, {"model": str(teacher_dir)})
    reference = snapshot(train(taught).run_dir)
    # The teacher samples first: 2 of its 4 samples of stage 1 are journaled.
    resumed, sampled = killed_and_resumed(taught, 3, monkeypatch)
    assert_same_run(snapshot(resumed.run_dir), reference)
    assert len(sampled) == 2 * 12 - 2  # the two journaled teacher samples were reused


@pytest.mark.slow  # one 2-process launch (~20 s)
def test_two_processes_with_a_teacher_and_hints_agree_with_one(workspace, tiny_model_dir,
                                                               teacher_dir):
    one = config(workspace, tiny_model_dir, {"model": str(teacher_dir)},
                 raft={"stages": 1, "prompts_per_stage": 3, "hints": {"samples": 2}},
                 selection={"min_reward": 0.3}, run={"output_dir": str(workspace / "one")})
    rows = stage_rows(train(one).run_dir, 1)
    assert stage_rows(in_two_processes(workspace, one), 1) == rows
    assert any(r.get("source") for r in rows) and any(r.get("hint") for r in rows)
