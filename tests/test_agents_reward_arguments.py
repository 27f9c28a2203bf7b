"""What a reward function gets in a multi-turn run, by TRL's conventions: `completions` as
chat messages where the prompts are (the user's functions; built-ins keep the text) and, declared,
`environments`: the instance each trajectory ran in, or one replayed from its turns where that
is gone (a resumed stage, `raftlm score`, evaluation)."""

import json

from tiny import write_digits_task

from raftlm import RaftConfig, train
from raftlm.agents import scoring_environments
from raftlm.agents.environments import replayed
from raftlm.config import RewardConfig, RewardTerm
from raftlm.data.prompts import PromptRecord
from raftlm.rewards.reward import build_reward
from raftlm.stage.rollouts import Rollout

# A step environment that keeps a state the reward reads: the digits of every action so far.
ENVIRONMENTS = '''
class Counter:
    """Two steps and done; remembers every digit the model wrote."""

    def reset(self, prompt, answer, **row):
        self.digits, self.steps = "", 0
        return None

    def step(self, action):
        self.steps += 1
        self.digits += "".join(ch for ch in action if ch.isdigit())
        return f"noted {self.steps}", None, self.steps >= 2


class Vault:
    """TRL's shape: public methods are tools."""

    def reset(self, **row):
        self.stored = []

    def store(self, value: int) -> str:
        """Store a value.

        Args:
            value: what to store.
        """
        self.stored.append(value)
        return "ok"
'''

REWARDS = '''
SEEN = []

def digits_kept(prompts, completions, environments, **kwargs):
    SEEN.append((prompts, completions))
    return [float(len(env.digits)) for env in environments]

def turns_seen(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]
'''


def terms(*names):
    return build_reward(RewardConfig(terms=[RewardTerm(name=name) for name in names]))


def write_task(folder):
    write_digits_task(folder, REWARDS)
    (folder / "envs.py").write_text(ENVIRONMENTS)
    return folder


def test_a_users_function_gets_messages_and_a_builtin_the_text(tmp_path):
    write_task(tmp_path)
    reward = terms(f"{tmp_path / 'rewards.py'}:turns_seen", "numeric_answer")
    turns = [{"role": "assistant", "content": "call", "finish_reason": "stop"},
             {"role": "tool", "name": "calculator", "content": "4", "error": None,
              "arguments": {"expression": "2+2"}},
             {"role": "assistant", "content": "It is 4", "finish_reason": "eos"}]
    chat = [{"role": "user", "content": "What is 2+2?"}]  # TRL's conversational format
    got = reward([chat], ["call4It is 4"], {"answer": ["4"]}, trajectories=[turns])
    assert got.per_term["turns_seen"].tolist() == [3.0]  # three messages
    assert got.per_term["numeric_answer"].tolist() == [1.0]  # read from the last model turn
    text = reward(["What is 2+2?"], ["call4It is 4"], {"answer": ["4"]}, trajectories=[turns])
    assert text.per_term["turns_seen"].tolist() == [12.0]  # a text prompt: the text, as before
    single = reward([chat], ["4"], {"answer": ["4"]}, trajectories=[None])
    assert single.per_term["turns_seen"].tolist() == [1.0]  # single-turn: the text, as before


def test_conversational_completions_are_trls():
    from raftlm.rewards.functions import conversational

    turns = [{"role": "assistant", "content": "a", "finish_reason": "stop", "prefilled": "x"},
             {"role": "tool", "name": "t", "content": "r", "error": None, "arguments": {}}]
    chat = [{"role": "user", "content": "q"}]
    assert conversational([chat, "p", chat], ["ar", "ar", "b"], [turns, turns, None]) == [
        [{"role": "assistant", "content": "a"}, {"role": "tool", "name": "t", "content": "r"}],
        "ar", "b"]


def test_a_replayed_environment_is_where_the_trajectory_left_its_own(tmp_path):
    import importlib.util

    write_task(tmp_path)
    spec = importlib.util.spec_from_file_location("envs", tmp_path / "envs.py")
    envs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(envs)
    steps = [{"role": "assistant", "content": "12"}, {"role": "user", "content": "noted 1"},
             {"role": "assistant", "content": "a3"}, {"role": "user", "content": "noted 2"}]
    counter = replayed(envs.Counter, {"prompt": "p", "answer": "1"}, steps, 5)
    assert (counter.digits, counter.steps) == ("123", 2)
    calls = [{"role": "assistant", "content": "..."},
             {"role": "tool", "name": "store", "arguments": {"value": 1}, "error": None},
             {"role": "tool", "name": "store", "arguments": {"value": "x"},
              "error": "bad_arguments"},  # never ran: not replayed
             {"role": "tool", "name": "calculator", "arguments": {"expression": "1"},
              "error": None},  # not the environment's tool
             {"role": "tool", "name": "store", "arguments": {"value": 2}, "error": "raised"}]
    assert replayed(envs.Vault, {"prompt": "p"}, calls, 5).stored == [1, 2]


def config(tmp_path, **evaluation):
    return RaftConfig.from_dict({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 3},
        "model": {"path": str(tmp_path / "model"), "dtype": "fp32", "lora": {"r": 4, "alpha": 8}},
        "data": {"train_file": str(tmp_path / "train.jsonl"),
                 "eval_file": str(tmp_path / "eval.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 3, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "reward": {"terms": [f"{tmp_path / 'rewards.py'}:digits_kept"]},
        "training": {"learning_rate": 1e-2, "micro_batch_size": 2},
        "evaluation": {"enabled": True, "sampled": False, **evaluation},
        "rollout": {"environment": f"{tmp_path / 'envs.py'}:Counter", "max_turns": 2,
                    "max_trajectory_tokens": 200},
    })


def digits_said(turns):
    return sum(ch.isdigit() for t in turns if t["role"] == "assistant" for ch in t["content"])


def test_a_run_scores_each_trajectory_by_the_environment_it_ran_in(tmp_path, tiny_model_dir):
    write_task(tmp_path)
    (tmp_path / "model").symlink_to(tiny_model_dir)
    result = train(config(tmp_path))
    rows = [json.loads(line) for line in (result.run_dir / "stages/001/candidates.jsonl").open()]
    assert len(rows) == 6
    for row in rows:
        assert row["reward"] == digits_said(row["turns"])
    assert any(row["reward"] > 0 for row in rows), "the tiny model writes digits sometimes"
    # Evaluation rolls out again and scores with replayed instances: the same rule holds.
    for stage in ("000", "001"):
        for item in map(json.loads, (result.run_dir / f"stages/{stage}/eval.jsonl").open()):
            assert item["reward"] == digits_said(item["turns"])


def test_without_the_live_instance_a_replay_stands_in(tmp_path, tiny_model_dir):
    write_task(tmp_path)
    (tmp_path / "model").symlink_to(tiny_model_dir)
    cfg = config(tmp_path)
    record = PromptRecord(0, "Say 1 digits", "", [], {"answer": "1"})
    turns = [{"role": "assistant", "content": "7x7"}, {"role": "user", "content": "noted 1"},
             {"role": "assistant", "content": "8"}, {"role": "user", "content": "noted 2"}]
    rollout = Rollout("", [], "eos", turns=turns)
    live = object()
    (row,) = scoring_environments(cfg, [record], [[rollout, rollout]], [[live, None]])
    assert row[0] is live and row[1].digits == "778"
    no_environment = RaftConfig.from_dict({**cfg.to_dict(), "rollout": {"tools": ["calculator"]}})
    assert scoring_environments(no_environment, [record], [[rollout]]) is None


def test_a_builtin_named_by_its_module_still_reads_text():
    import pytest

    pytest.importorskip("math_verify")
    reward = terms("raftlm.rewards:math_answer")
    turns = [{"role": "assistant", "content": "12 + 30 = ?"},
             {"role": "tool", "name": "calculator", "content": "42", "error": None},
             {"role": "assistant", "content": "So it is $42$."}]
    got = reward(["q"], ["$7$"], {"answer": ["42"]},  # the text alone would be wrong
                 trajectories=[turns])
    assert got.scores.tolist() == [1.0]


def test_only_a_term_that_declares_environments_gets_them_replayed(tmp_path):
    write_task(tmp_path)
    assert not terms("numeric_answer").declares("environments")
    assert terms(f"{tmp_path / 'rewards.py'}:digits_kept").declares("environments")
