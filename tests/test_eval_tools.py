"""Evaluation of a tool run: each set is rolled out with the run's tools and tool_choice, greedy
trajectories for accuracy, answers read from the last model turn (tiny model, scripted turns)."""

import test_agents_rollout
from test_agents_rollout import CALL

from raftlm.config import RaftConfig
from raftlm.data.prompts import PromptSet, build_prompt_set
from raftlm.evaluation.evaluate import evaluate
from raftlm.rewards.reward import build_reward

scripted = test_agents_rollout.scripted  # the fixture: the sampler replaced by a script
OPENING = '<tool_call>{"name": "calculator", "arguments": {"expression": "'


def tool_config(**rollout):
    return RaftConfig.from_dict({
        "data": {"task": "multiplication"}, "generation": {"max_new_tokens": 100},
        "evaluation": {"sampled": False},
        "rollout": {"tools": ["calculator"], **rollout}})


def held_out(tok):
    rows = [{"prompt": "What is 12 * 34?", "answer": "408"},
            {"prompt": "What is 11 * 11?", "answer": "121"}]
    return PromptSet(build_prompt_set(rows, tok, prompt_field="prompt", max_prompt_tokens=4096,
                                      system_prompt=None, source="test").records, 0, "test")


def evaluated(model, tok, config):
    return evaluate(model, tok, held_out(tok), build_reward(config.reward), config)


def test_a_tool_runs_accuracy_is_with_the_tool_and_its_rows_hold_the_turns(model, tok,
                                                                          scripted):
    scripted[:] = [CALL, "It is 408."]
    metrics, items = evaluated(model, tok, tool_config())
    assert metrics["eval/accuracy"] == 0.5  # 408 is right for the first prompt only
    assert [t["role"] for t in items[0]["turns"]] == ["assistant", "tool", "assistant"]
    assert items[0]["turns"][1]["content"] == "408"


def test_a_number_in_the_tools_output_is_not_the_models_answer(model, tok, scripted):
    scripted[:] = [CALL, "Done."]
    metrics, _ = evaluated(model, tok, tool_config())
    assert metrics["eval/accuracy"] == 0.0


def test_evaluation_forces_the_call_as_the_run_does(model, tok, scripted):
    scripted[:] = [CALL.removeprefix(OPENING), "It is 408."]
    metrics, items = evaluated(model, tok, tool_config(tool_choice="calculator"))
    assert metrics["eval/accuracy"] == 0.5
    assert items[0]["turns"][0]["prefilled"] == OPENING
    assert tok.decode(scripted.contexts[0]).endswith(OPENING)


def test_greedy_trajectories_are_the_same_under_any_seed(model, tok):
    responses = []
    for seed in (0, 1):
        config = tool_config(max_turns=2)
        config.run.seed, config.generation.max_new_tokens = seed, 12
        _, items = evaluated(model, tok, config)
        responses.append([item["response"] for item in items])
    assert responses[0] == responses[1] and all(responses[0])


def test_sampled_trajectories_are_judged_per_sample(model, tok, scripted):
    scripted[:] = [CALL, "It is 408."]
    config = tool_config()
    config.evaluation.sampled, config.evaluation.samples_per_prompt = True, 2
    metrics, items = evaluated(model, tok, config)
    assert metrics["eval/sampled_accuracy"] == 0.5
    assert [list(s["correct"].values()) for s in items[0]["samples"]] == [[True], [True]]
    assert "turns" in items[0]["samples"][0]


def test_raftlm_eval_with_a_tool_rolls_out_and_writes_the_turns(tiny_model_dir, scripted,
                                                                tmp_path):
    import json

    from raftlm.cli import main as cli_main

    scripted[:] = [CALL, "It is 408."]
    (tmp_path / "products.jsonl").write_text(
        json.dumps({"prompt": "What is 12 * 34?", "answer": "408"}) + "\n")
    output = tmp_path / "out.json"
    assert cli_main(["eval", str(tiny_model_dir), "--file", str(tmp_path / "products.jsonl"),
                     "--tool", "calculator", "--max-new-tokens", "200", "--output",
                     str(output), "--quiet"]) == 0
    assert json.loads(output.read_text())["eval/products/accuracy"] == 1.0
    [row] = [json.loads(line) for line in (tmp_path / "out.items.jsonl").open()]
    assert [t["role"] for t in row["turns"]] == ["assistant", "tool", "assistant"]


STEPS = """
class Noted:
    def reset(self, **row):
        self.steps = 0

    def step(self, action):
        self.steps += 1
        return "noted, go on", None, self.steps >= 2
"""


def test_a_tool_runs_kl_counts_the_models_tokens_only(model, tok, tmp_path):
    """A LoRA policy not trained yet is pi_0: its KL is 0 over the model's tokens, which it
    would not be over the environment's (recorded as 0.0, never pi_t's draws)."""
    import copy

    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "noted.py").write_text(STEPS)
    config = RaftConfig.from_dict({
        "model": {"dtype": "fp32"}, "data": {"task": "multiplication"},
        "generation": {"max_new_tokens": 6},
        "evaluation": {"sampled": True, "samples_per_prompt": 2, "kl_responses": 4},
        "rollout": {"environment": f"{tmp_path / 'noted.py'}:Noted", "max_turns": 2}})
    metrics, items = evaluate(policy, tok, held_out(tok), build_reward(config.reward), config)
    observed = [t for item in items for s in item["samples"] for t in s["turns"]
                if t["role"] == "user"]
    assert observed, "the trajectories hold the environment's tokens"
    assert abs(metrics["eval/kl_to_initial"]) < 1e-4
