"""Multi-turn rollouts: token continuity, the loss mask, errors as observations, budgets,
environments of both shapes, and exact resume (tiny models, scripted turns and tools)."""

import dataclasses

import pytest

import raftlm.agents.rollout as rollout_module
from raftlm.agents import Trajectory, roll_out, rollout_metrics
from raftlm.agents.chat_format import ChatFormat
from raftlm.agents.rollout import turn_seed
from raftlm.agents.tools import load_tools
from raftlm.config import RaftConfig, RewardConfig, RewardTerm
from raftlm.data.prompts import build_prompt_set
from raftlm.rewards.reward import build_reward, score
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate, sample_seeds

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
ENVIRONMENTS = '''
class Vault:
    """TRL's environment_factory shape: reset, and public methods that are the tools."""
    made = 0

    def __init__(self):
        Vault.made += 1

    def reset(self, prompt, answer, **row):
        self.secret = int(answer)
        return "Guess the number."

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: Your guess.
        """
        return "right" if number == self.secret else "wrong"


class Flaky:
    """Raises on its first step, hangs on the others."""

    def step(self, action):
        import time

        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 1:
            raise KeyError("no such move")
        time.sleep(3)


class Counter:
    """The step shape: every model turn is an action."""

    def reset(self, prompt, **row):
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return f"step {self.steps}", float(len(action)), self.steps >= 3
'''


class Journal:
    """What roll_out uses of a stage journal."""

    def __init__(self, samples=None):
        self.samples = dict(samples or {})
        self.added = {}

    def add_sample(self, prompt_id, sample, record):
        self.added[(prompt_id, sample)] = record


def config_with(tmp_path, max_new_tokens=100, **rollout):
    (tmp_path / "envs.py").write_text(ENVIRONMENTS)
    rollout = {k: (str(tmp_path / v) if k == "environment" else v) for k, v in rollout.items()}
    return RaftConfig.from_dict({"data": {"task": "arithmetic"}, "run": {"seed": 3},
                                 "generation": {"max_new_tokens": max_new_tokens},
                                 "rollout": rollout})


def prompts(tok, n=2):
    rows = [{"prompt": f"What is {i} * 7?", "answer": str(7 * i)} for i in range(n)]
    return build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=4096,
                            system_prompt=None, source="test").records


class Script(list):
    """Each turn's text; `contexts` collects what the sampler was asked to continue."""

    contexts: list


@pytest.fixture
def scripted(monkeypatch, tok):
    """The sampler replaced by a script: `script[turn]` is turn `turn`'s text (a call stops at
    </tool_call> as the sampler's stop string would; other turns end on the eos token)."""
    script = Script()
    script.contexts = []

    def fake_generate(policy, tokenizer, contexts, counts, config, *, seeds, desc,
                      max_new_tokens, done=None, greedy=False, keep_kv=None, on_finish=None,
                      more=None, shared_prefix=None):
        script.contexts += contexts
        counts = [counts] * len(contexts) if isinstance(counts, int) else counts
        return [[complete(context, max_new_tokens)] * n for context, n in zip(contexts, counts)]

    def complete(context, max_new_tokens):
        turn = tok.decode(context).count("<|im_start|>assistant") - 1
        text = script[min(turn, len(script) - 1)]
        stop = text.endswith("</tool_call>")
        ids = tok(text + ("" if stop else "<|im_end|>"), add_special_tokens=False)["input_ids"]
        reason = "stop_string" if stop else "eos"
        if len(ids) > max_new_tokens:
            ids, reason = ids[:max_new_tokens], "length"
        return Completion(tok.decode(ids, skip_special_tokens=True), ids, reason,
                          [-0.5] * len(ids))

    monkeypatch.setattr(rollout_module, "generate", fake_generate)
    return script


def run(tok, config, records=None, counts=None, journal=None, policy=None):
    records = records or prompts(tok)
    counts = counts or [1] * len(records)
    journal = journal or Journal()
    rolled = roll_out(policy, tok, records, counts, config, 1, have=[[] for _ in records],
                      journal=journal)
    return rolled.rows, journal


def test_a_trajectory_is_model_and_observation_tokens_exactly_as_appended(tok, scripted,
                                                                           tmp_path):
    scripted[:] = [CALL, "It is 408."]
    config = config_with(tmp_path, tools=["calculator"])
    [[trajectory], _], journal = run(tok, config)
    chat = ChatFormat(tok, load_tools(["calculator"]))
    first = tok(CALL, add_special_tokens=False)["input_ids"]
    answer = tok("It is 408.<|im_end|>", add_special_tokens=False)["input_ids"]
    observation = chat.observation_ids([{"role": "tool", "name": "calculator",
                                         "content": "408"}], first)
    assert trajectory.token_ids == first + observation + answer
    assert trajectory.loss_mask == [1] * len(first) + [0] * len(observation) + [1] * len(answer)
    assert trajectory.token_log_probs == ([-0.5] * len(first) + [0.0] * len(observation)
                                          + [-0.5] * len(answer))
    # The prompt and the trajectory are the template's rendering of the whole conversation.
    record = prompts(tok)[0]
    conversation = [{"role": "system", "content": chat.system_prompt},
                    {"role": "user", "content": record.prompt},
                    {"role": "assistant", "content": CALL},
                    {"role": "tool", "name": "calculator", "content": "408"},
                    {"role": "assistant", "content": "It is 408."}]
    rendered = tok.apply_chat_template(conversation, tokenize=False).removesuffix("\n")
    assert chat.prompt_ids(record.prompt) + trajectory.token_ids == tok(
        rendered, add_special_tokens=False)["input_ids"]
    assert [t["role"] for t in trajectory.turns] == ["assistant", "tool", "assistant"]
    assert trajectory.turns[1] == {"role": "tool", "name": "calculator", "content": "408",
                                        "arguments": {"expression": "12 * 34"}, "error": None}
    assert trajectory.text == tok.decode(trajectory.token_ids, skip_special_tokens=True)
    assert trajectory.finish_reason == "eos"
    assert Trajectory.from_dict(journal.added[(record.id, 0)]) == trajectory


def test_each_prompt_comes_back_as_the_model_saw_it(tok, scripted, tmp_path):
    scripted[:] = ["Done."]
    records = prompts(tok)
    config = config_with(tmp_path, environment="envs.py:Vault")
    rolled = roll_out(None, tok, records, [2, 0], config, 1, have=[[], []], journal=Journal())
    assert rolled.prompts[0].token_ids == scripted.contexts[0]  # what was sampled after
    for record, seen in zip(records, rolled.prompts):  # the second: no sample, same prompt
        assert "Guess the number." in seen.text and '"name": "guess"' in seen.text
        assert (seen.id, seen.prompt, seen.columns) == (record.id, record.prompt, record.columns)
        assert seen.token_ids == tok(seen.text, add_special_tokens=False)["input_ids"]


def test_without_a_journal_trajectories_are_sampled_and_kept_nowhere(tok, scripted, tmp_path):
    scripted[:] = [CALL, "It is 408."]  # as evaluation or chat would roll out
    rolled = roll_out(None, tok, prompts(tok), [2, 1], config_with(tmp_path, tools=["calculator"]),
                      0)
    assert [[t.turns[1]["content"] for t in row] for row in rolled.rows] == [["408", "408"],
                                                                             ["408"]]


def test_failed_calls_are_observations_the_model_answers_and_are_counted(tok, scripted,
                                                                         tmp_path):
    scripted[:] = ["<tool_call>{oops}</tool_call>",
                   '<tool_call>{"name": "abacus", "arguments": {}}</tool_call>', "Fine: 408."]
    config = config_with(tmp_path, tools=["calculator"], max_turns=4)
    rows, _ = run(tok, config)
    trajectory = rows[0][0]
    assert [t.get("error") for t in trajectory.turns] == [None, "parse", None, "unknown_tool",
                                                          None]
    assert "could not read the tool call" in trajectory.turns[1]["content"]
    assert rollout_metrics([t for row in rows for t in row]) == {
        "rollout/turns_mean": 3.0, "rollout/tool_calls_mean": 1.0,
        "rollout/tool_errors": 4, "rollout/parse_failures": 2}


def test_a_call_on_the_last_turn_is_not_run(tok, scripted, tmp_path):
    scripted[:] = [CALL]
    [[trajectory], _], _ = run(tok, config_with(tmp_path, tools=["calculator"], max_turns=1))
    assert [t["role"] for t in trajectory.turns] == ["assistant"]
    assert trajectory.loss_mask == [1] * len(trajectory.token_ids)


def test_the_trajectory_keeps_to_its_token_budget(tok, scripted, tmp_path):
    scripted[:] = [CALL, "It is 408, as the calculator says."]
    config = config_with(tmp_path, tools=["calculator"], max_trajectory_tokens=120)
    [[trajectory], _], _ = run(tok, config)
    assert len(trajectory.token_ids) == 120 and trajectory.finish_reason == "length"
    config = config_with(tmp_path, tools=["calculator"], max_trajectory_tokens=len(CALL) + 5)
    [[trajectory], _], _ = run(tok, config)  # no room for the observation: it ends there
    assert trajectory.loss_mask == [1] * len(CALL) and trajectory.finish_reason == "length"
    assert trajectory.turns[-1]["shown"] is False


def test_tool_output_is_cut_to_max_tool_output_tokens(tok, scripted, tmp_path):
    scripted[:] = ['<tool_call>{"name": "calculator", "arguments": {"expression": "7 ** 40"}}'
                   "</tool_call>", "Big."]
    config = config_with(tmp_path, tools=["calculator"], max_tool_output_tokens=5)
    [[trajectory], _], _ = run(tok, config)
    assert trajectory.turns[1]["content"] == str(7 ** 40)[:5]


def test_a_trl_environment_gives_each_trajectory_its_instance_and_methods_as_tools(
        tok, scripted, tmp_path):
    scripted[:] = ['<tool_call>{"name": "guess", "arguments": {"number": 7}}</tool_call>', "Done."]
    config = config_with(tmp_path, environment="envs.py:Vault")
    rows, _ = run(tok, config, counts=[2, 1])
    assert [[t.turns[1]["content"] for t in row] for row in rows] == [["wrong", "wrong"],
                                                                      ["right"]]
    first = tok.decode(scripted.contexts[0])
    assert "Guess the number.<|im_end|>\n<|im_start|>assistant" in first  # reset's text
    assert '"name": "guess"' in first  # the method's schema is in the system prompt


def test_a_step_environment_drives_the_real_sampler_and_ends_when_done(tok, model, tmp_path):
    config = config_with(tmp_path, 12, environment="envs.py:Counter", max_turns=5,
                         max_trajectory_tokens=400)
    records = prompts(tok)
    rows, _ = run(tok, config, records, [2, 1], policy=model)
    chat = ChatFormat(tok, [])
    for record, row in zip(records, rows):
        for j, trajectory in enumerate(row):
            assert [t["role"] for t in trajectory.turns] == ["assistant", "user"] * 3
            assert [t["reward"] for t in trajectory.turns[1::2]] == [
                float(len(t["content"])) for t in trajectory.turns[::2]]
            # Each model turn is exactly what the sampler gives for the context so far, alone.
            context = chat.prompt_ids(record.prompt)
            mask = trajectory.loss_mask
            starts = [k for k in range(len(mask)) if mask[k] == 1 and (k == 0 or mask[k - 1] == 0)]
            for turn, start in enumerate(starts):
                end = next((k for k in range(start, len(mask)) if mask[k] == 0), len(mask))
                if turn == 0:  # sample j of the prompt, as a single-turn stage draws it
                    [row] = generate(model, tok, [context], j + 1, config.generation,
                                     seeds=sample_seeds(3, 1, [record.id]))
                    alone = row[j]
                else:
                    [[alone]] = generate(model, tok, [context + trajectory.token_ids[:start]], 1,
                                         config.generation,
                                         seeds=[turn_seed(3, 1, record.id, j, turn)])
                assert alone.token_ids == trajectory.token_ids[start:end]


def test_a_resumed_call_keeps_journaled_trajectories_and_samples_the_same_rest(tok, model,
                                                                                tmp_path):
    config = config_with(tmp_path, 12, environment="envs.py:Counter", max_trajectory_tokens=300)
    records = prompts(tok)
    full, journal = run(tok, config, records, [2, 2], policy=model)
    kept = {(0, 1): journal.added[(0, 1)], (1, 0): journal.added[(1, 0)]}
    resumed, again = run(tok, config, records, [2, 2], journal=Journal(kept), policy=model)
    assert resumed == full
    assert set(again.added) == {(0, 0), (1, 1)}  # only the missing ones sampled
    assert [dataclasses.asdict(t) for row in resumed for t in row] == [
        dataclasses.asdict(t) for row in full for t in row]


def test_the_docs_examples_run(tok, scripted, tmp_path):
    """docs/agents.md's tool and both environments, as written there."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "agents.md").read_text()
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", doc, re.S)
    for name, code in blocks:
        (tmp_path / name).write_text(code)
    assert sorted(name for name, _ in blocks) == ["countdown.py", "mytools.py", "vault.py",
                                                  "vault_rewards.py"]
    [price] = load_tools([f"{tmp_path / 'mytools.py'}:lookup_price"])
    assert price.fn("pear", 2) == "1.50 EUR"
    records = build_prompt_set([{"prompt": "Open the vault.", "answer": "42"}], tok,
                               prompt_field="prompt", max_prompt_tokens=4096,
                               system_prompt=None, source="test").records
    scripted[:] = ['<tool_call>{"name": "guess", "arguments": {"number": 50}}</tool_call>',
                   '<tool_call>{"name": "guess", "arguments": {"number": 42}}</tool_call>', "42"]
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"},
                                   "generation": {"max_new_tokens": 99}, "rollout": {
        "environment": f"{tmp_path / 'vault.py'}:Vault", "max_turns": 8}})
    rolled = roll_out(None, tok, records, [1], config, 1, have=[[]], journal=Journal())
    [[vault]], [[instance]] = rolled.rows, rolled.environments
    assert [t["content"] for t in vault.turns if t["role"] == "tool"] == ["lower", "open"]
    assert (instance.tries, instance.opened) == (2, True)
    reward = build_reward(RewardConfig(terms=[RewardTerm(
        name=f"{tmp_path / 'vault_rewards.py'}:opened_quickly")]))
    scored = score(reward, rolled.prompts, rolled.rows, environments=rolled.environments)
    assert scored.scores.tolist() == [pytest.approx(0.9)]  # opened at the second try
    scripted[:] = ["I say 50", "Then 42"]
    config = RaftConfig.from_dict({"data": {"task": "arithmetic"},
                                   "generation": {"max_new_tokens": 99}, "rollout": {
        "environment": f"{tmp_path / 'countdown.py'}:Countdown", "max_turns": 6}})
    [[countdown]] = roll_out(None, tok, records, [1], config, 1, have=[[]],
                             journal=Journal()).rows
    assert [(t["content"], t["reward"], t["done"]) for t in countdown.turns
            if t["role"] == "user"] == [("Lower.", 0.0, False), ("Correct.", 1.0, True)]


def test_the_hf_backend_rolls_out_too_and_reuses_nothing_from_a_journal(tok, model, tmp_path):
    config = config_with(tmp_path, 8, environment="envs.py:Counter", max_trajectory_tokens=300)
    config.generation.backend = "hf"
    records = prompts(tok)
    kept = {(0, 0): {"text": "old", "token_ids": [5], "finish_reason": "eos"}}
    rows, journal = run(tok, config, records, [2, 1], journal=Journal(kept), policy=model)
    assert set(journal.added) == {(0, 0), (0, 1), (1, 0)}  # hf re-samples the stage
    for trajectory in (t for row in rows for t in row):
        assert [t["role"] for t in trajectory.turns] == ["assistant", "user"] * 3
        assert 0 in trajectory.loss_mask and len(trajectory.loss_mask) == len(
            trajectory.token_ids) == len(trajectory.token_log_probs)


def test_a_step_that_raises_or_hangs_is_an_error_observation(tok, scripted, tmp_path):
    scripted[:] = ["left", "right", "stop"]
    config = config_with(tmp_path, environment="envs.py:Flaky", max_turns=3, tool_timeout_s=0.3)
    [[trajectory], _], _ = run(tok, config)
    errors = [t for t in trajectory.turns if t["role"] == "user"]
    assert [e["error"] for e in errors] == ["raised", "timeout", "timeout"]  # the last too
    assert errors[0]["content"] == "Error: step raised: KeyError: 'no such move'"
    assert rollout_metrics([trajectory])["rollout/tool_errors"] == 3
