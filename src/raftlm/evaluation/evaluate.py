"""Evaluate the policy on held-out prompts: did alignment work, and what did it cost?

Greedy, one response per prompt:
  eval/reward_mean, eval/accuracy (prompts with an `answer`), eval/response_tokens_mean.
Sampled (`evaluation.sampled`): K = evaluation.samples_per_prompt responses per prompt with the
`generation` settings and the same seeds every stage, so stages differ only by the policy:
  eval/sampled_reward_mean, eval/best_of_k_reward, eval/sampled_accuracy, eval/pass_at_k,
  eval/distinct_1, eval/distinct_2, eval/sampled_tokens_mean and eval/kl_to_initial.
Definitions are in `raftlm.evaluation.metrics`. The KL's pi_0 is the LoRA policy with its adapter
disabled, or, for full fine-tuning, the initial weights reloaded from `model.path` for the
duration of the estimate (no second copy is held between stages). Both sides are taken at the
sampling temperature T (`generation.temperature`): the estimate is KL(pi_t^T || pi_0^T) of the
distributions softmax(logits / T) the responses were drawn from, unbiased without top-p/top-k
(with truncation, the samples come from the truncated pi_t^T: a documented approximation).
pi_t's log-probs are those recorded while sampling (`Completion.token_log_probs`, log
softmax(logits / T) of each sampled token), so the estimate costs one forward pass per
response (pi_0's), not two. Greedy and sampled responses
are decoded in one pass that shares each prompt's prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from raftlm.config import RaftConfig
from raftlm.data.prompts import PromptRecord, PromptSet
from raftlm.evaluation.metrics import best_of_k, distinct_n, nanmean, sequence_kl
from raftlm.models.loading import (
    is_lora,
    materialize_model,
    merged_adapter,
    resolve_dtype,
)
from raftlm.rewards.reward import Reward, score
from raftlm.rewards.verifiable import math_answer, numeric_answer
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate_sharded, sample_seeds
from raftlm.training.batches import Example, response_log_probs

SAMPLING_STAGE = 0  # seeds of sampled eval: (run seed, 0, prompt id), never a training stage's


def accuracy_check(config: RaftConfig, prompts: PromptSet) -> Any:
    """The verifiable check behind `eval/accuracy`, or None when there are no references."""
    if not prompts.records or "answer" not in prompts.records[0].columns:
        return None
    names = {term.name for term in config.reward.terms}
    return math_answer if "math_answer" in names else numeric_answer


def evaluate(policy: Any, tokenizer: Any, prompts: PromptSet, reward: Reward,
             config: RaftConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out metrics of `policy` (the unmerged training model); returns metrics and the
    greedy responses. With several processes the sampling is split between them and every
    process computes the same metrics from the gathered responses."""
    records, ev = prompts.records, config.evaluation
    device = next(policy.parameters()).device
    ids = [r.token_ids for r in records]
    with _precision(config, device):
        with merged_adapter(policy) as merged:
            if ev.sampled:
                # One pass: greedy and sampled responses share each prompt's prefill and batch.
                both = generate_sharded(
                    merged, tokenizer, ids, ev.samples_per_prompt, config.generation,
                    seeds=sample_seeds(config.run.seed, SAMPLING_STAGE, [r.id for r in records]),
                    desc="eval", max_new_tokens=ev.max_new_tokens, with_greedy=True,
                )
                greedy, sampled = [row[:1] for row in both], [row[1:] for row in both]
            else:
                greedy = generate_sharded(merged, tokenizer, ids, 1, config.generation,
                                          greedy=True, desc="eval",
                                          max_new_tokens=ev.max_new_tokens)
                sampled = None
        metrics, samples = greedy_metrics(prompts, greedy, reward, config)
        if sampled is not None:
            metrics.update(sampled_metrics(prompts, sampled, reward, config))
            # Outside the merged context: pi_0 needs the adapter unmerged to switch it off.
            metrics["eval/kl_to_initial"] = kl_to_initial(policy, tokenizer, records, sampled,
                                                          config)
    return metrics, samples


def greedy_metrics(prompts: PromptSet, completions: list[list[Completion]], reward: Reward,
                   config: RaftConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Reward, accuracy and length of one greedy response per prompt, plus the responses."""
    records = prompts.records
    result = score(reward, records, completions)
    metrics = {
        "eval/reward_mean": nanmean(result.scores),
        "eval/response_tokens_mean": float(np.mean([len(row[0].token_ids) for row in completions])),
    }
    correct = _correct(config, prompts, completions)
    if correct is not None:
        metrics["eval/accuracy"] = float(np.mean(correct))
    samples = [
        {"prompt_id": r.id, "prompt": r.text, "response": row[0].text, "reward": float(s)}
        for r, row, s in zip(records, completions, result.scores)
    ]
    return metrics, samples


def sampled_metrics(prompts: PromptSet, completions: list[list[Completion]], reward: Reward,
                    config: RaftConfig) -> dict[str, float]:
    """Reward, best-of-K, accuracy, pass@K, diversity and length of K samples per prompt."""
    records = prompts.records
    k = len(completions[0]) if completions else 0
    rewards = score(reward, records, completions).scores.reshape(len(records), k)
    texts = [c.text for row in completions for c in row]
    metrics = {
        "eval/sampled_reward_mean": nanmean(rewards),
        "eval/best_of_k_reward": best_of_k(rewards),
        "eval/distinct_1": distinct_n(texts, 1),
        "eval/distinct_2": distinct_n(texts, 2),
        "eval/sampled_tokens_mean": float(np.mean([len(c.token_ids) for row in completions
                                                   for c in row])),
    }
    correct = _correct(config, prompts, completions)
    if correct is not None:
        metrics["eval/sampled_accuracy"] = float(np.mean(correct))
        metrics["eval/pass_at_k"] = float(np.mean(correct.reshape(len(records), k).any(axis=1)))
    return metrics


def kl_to_initial(policy: Any, tokenizer: Any, records: list[PromptRecord],
                  completions: list[list[Completion]], config: RaftConfig) -> float | None:
    """KL(pi_t || pi_0) at the sampling temperature, estimated on the sampled responses (see
    `metrics.sequence_kl`): pi_t's recorded log-probs (or a forward pass) against pi_0's."""
    pairs = [(r, c) for r, row in zip(records, completions) for c in row]
    if config.evaluation.kl_responses:
        # A forward pass per response for pi_0 (pi_t's log-probs come with the samples when
        # the backend records them): the estimate's cost, so it takes a subset.
        pairs = pairs[: config.evaluation.kl_responses]
    examples = [Example(r.token_ids, c.token_ids) for r, c in pairs]
    device = next(policy.parameters()).device

    def log_probs(model: Any) -> list[np.ndarray]:
        # At the temperature the sampler drew (and recorded pi_t's log-probs) at.
        return response_log_probs(model, examples, tokenizer.pad_token_id,
                                  config.training.micro_batch_size, device,
                                  config.generation.temperature)

    recorded = [c.token_log_probs for _, c in pairs]
    if all(lp is not None for lp in recorded):
        current = [np.asarray(lp, dtype=np.float32) for lp in recorded]
    else:
        current = log_probs(policy)
    with initial_policy(policy, config) as reference:
        initial = log_probs(reference)
    return sequence_kl(current, initial)


@contextmanager
def initial_policy(policy: Any, config: RaftConfig) -> Iterator[Any]:
    """pi_0: the LoRA policy with its adapter switched off, or the initial full weights."""
    if is_lora(policy):
        with policy.disable_adapter():
            yield policy
        return
    reference = AutoModelForCausalLM.from_pretrained(
        materialize_model(config.model), dtype=torch.float32, local_files_only=True
    ).to(next(policy.parameters()).device)
    yield reference.eval()


def _correct(config: RaftConfig, prompts: PromptSet, completions: list[list[Completion]]
             ) -> np.ndarray | None:
    """1/0 per completion (flat, prompt-major) where the prompts carry an `answer`."""
    check = accuracy_check(config, prompts)
    if check is None:
        return None
    flat = [(r, c) for r, row in zip(prompts.records, completions) for c in row]
    return np.asarray(check([r.prompt for r, _ in flat], [c.text for _, c in flat],
                            answer=[r.columns["answer"] for r, _ in flat]), dtype=float)


@contextmanager
def _precision(config: RaftConfig, device: torch.device) -> Iterator[None]:
    # The same mixed precision as training, so pi_t and pi_0 log-probs are comparable.
    bf16 = resolve_dtype(config.model.dtype, device) == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield
