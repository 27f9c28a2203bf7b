"""Evaluate the policy: did alignment work, what did it cost, and on which sets?

The run's held-out prompts come first (metrics `eval/<metric>`, as always), then each set of
`evaluation.sets` (`eval/<name>/<metric>`; `raftlm.evaluation.sets`). Per set: one greedy
response per prompt, and with `samples` (held-out: `evaluation.samples_per_prompt` when
`evaluation.sampled`) n sampled ones with the set's temperature and the same seeds every stage,
so stages differ only by the policy. Greedy and sampled responses are decoded in one pass that
shares each prompt's prefill. The metrics and their names: `raftlm.evaluation.set_metrics`;
how answers are read: `raftlm.evaluation.extraction`.

Held-out only, as before: eval/reward_mean, eval/sampled_reward_mean, eval/best_of_k_reward,
eval/distinct_1/2, eval/kl_to_initial. The KL's pi_0 is the LoRA policy with its adapter
disabled, or, for full fine-tuning, the initial weights reloaded from `model.path` for the
duration of the estimate (no second copy is held between stages). Both sides are taken at the
sampling temperature T (`generation.temperature`): the estimate is KL(pi_t^T || pi_0^T) of the
distributions softmax(logits / T) the responses were drawn from, unbiased without top-p/top-k
(with truncation, the samples come from the truncated pi_t^T: a documented approximation).
pi_t's log-probs are those recorded while sampling (`Completion.token_log_probs`, log
softmax(logits / T) of each sampled token), so the estimate costs one forward pass per
response (pi_0's), not two. A trajectory's KL sums over the model's tokens only (its loss
mask): the tools' and the environment's tokens were not drawn from pi_t.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from raftlm.agents import scoring_environments
from raftlm.config import RaftConfig
from raftlm.data.prompts import PromptRecord, PromptSet
from raftlm.evaluation.metrics import sequence_kl
from raftlm.evaluation.set_metrics import set_metrics
from raftlm.evaluation.sets import ResolvedSet, configured_sets, held_out_set
from raftlm.evaluation.trajectories import rolled_responses
from raftlm.models.loading import (
    is_lora,
    materialize_model,
    merged_adapter,
    resolve_dtype,
)
from raftlm.rewards.reward import Reward
from raftlm.sampling.completion import Completion
from raftlm.sampling.generate import generate_sharded, sample_seeds
from raftlm.training.batches import Example, response_log_probs

SAMPLING_STAGE = 0  # seeds of sampled eval: (run seed, 0, prompt id), never a training stage's


def evaluate(policy: Any, tokenizer: Any, prompts: PromptSet | None, reward: Reward,
             config: RaftConfig, sampled: bool = True
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics of `policy` (the unmerged training model) on the held-out `prompts` (None: none)
    and on every set of `evaluation.sets`; returns the metrics and one row per prompt and set
    (prompt, answer, responses, extracted answers, correct). With several processes the
    sampling is split between them and every process computes the same metrics. `sampled`
    False: greedy responses only, on every set (a stage `evaluation.sampled_every` skips)."""
    sets = [held_out_set(prompts, config)] if prompts is not None else []
    sets += configured_sets(config, tokenizer)
    if not sampled:
        sets = [dataclasses.replace(rset, samples=0) for rset in sets]
    return evaluate_sets(policy, tokenizer, sets, reward, config)


def evaluate_sets(policy: Any, tokenizer: Any, sets: list[ResolvedSet], reward: Reward,
                  config: RaftConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`evaluate` on sets already resolved (`raftlm eval` builds its own)."""
    device = next(policy.parameters()).device
    metrics: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    with _precision(config, device):
        for rset in sets:
            with merged_adapter(policy) as merged:
                if config.rollout is not None:  # with the run's tools, as it trains
                    rset, greedy, sampled = rolled_responses(merged, tokenizer, rset, config,
                                                             SAMPLING_STAGE)
                else:
                    greedy, sampled = _responses(merged, tokenizer, rset, config)
            envs = (partial(scoring_environments, config)  # replayed: gathered, not live
                    if reward is not None and reward.declares("environments") else None)
            found, rows = set_metrics(rset, greedy, sampled, reward,
                                      config.evaluation.correct_reward, envs)
            if sampled and "kl" in rset.metrics:
                # Outside the merged context: pi_0 needs the adapter unmerged to switch it off.
                found[rset.prefix + "kl_to_initial"] = kl_to_initial(
                    policy, tokenizer, rset.prompts.records, sampled, config)
            metrics.update(found)
            items += rows
    return metrics, items


def _responses(model: Any, tokenizer: Any, rset: ResolvedSet, config: RaftConfig
               ) -> tuple[list[Completion], list[list[Completion]] | None]:
    """One greedy response per prompt, and `rset.samples` sampled ones (or None)."""
    records = rset.prompts.records
    ids = [r.token_ids for r in records]
    desc = f"eval {rset.name}" if rset.name else "eval"
    if rset.samples:
        # One pass: greedy and sampled responses share each prompt's prefill and batch.
        both = generate_sharded(
            model, tokenizer, ids, rset.samples, rset.generation,
            seeds=sample_seeds(config.run.seed, SAMPLING_STAGE, [r.id for r in records]),
            desc=desc, max_new_tokens=rset.max_new_tokens, with_greedy=True,
        )
        return [row[0] for row in both], [row[1:] for row in both]
    greedy = generate_sharded(model, tokenizer, ids, 1, rset.generation, greedy=True,
                              desc=desc, max_new_tokens=rset.max_new_tokens)
    return [row[0] for row in greedy], None


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
    # A trajectory's observations are not pi_t's tokens (loss mask 0): only the model's count.
    masks = [np.asarray(c.loss_mask, dtype=bool) if getattr(c, "loss_mask", None) else None
             for _, c in pairs]
    current = [lp if m is None else lp[m] for lp, m in zip(current, masks)]
    initial = [lp if m is None else lp[m] for lp, m in zip(initial, masks)]
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


@contextmanager
def _precision(config: RaftConfig, device: torch.device) -> Iterator[None]:
    # The same mixed precision as training, so pi_t and pi_0 log-probs are comparable.
    bf16 = resolve_dtype(config.model.dtype, device) == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        yield
