"""Fine-tune: supervised fine-tuning on the selected responses (prompt tokens masked).

The loss is the mean negative log-likelihood over all response tokens of an optimizer step,
pooled across its micro-batches (and processes), i.e. the token-pooled definition of
`raftlm.core.token_pooled_nll`. The optimizer and the schedule live for the whole run.

With several processes every one holds the same selected set and the same shuffled order; each
optimizer step's examples are split between them. Every process therefore runs the same number
of optimizer steps (DDP would hang otherwise) and the gradient is the single-process one.

`training.objective` chooses the per-token loss (`raftlm.training.objectives`); sft is the
plain NLL above. The ratio objectives compare with the sampling policy's log-probs, fixed for
the stage: those the sampler recorded, else one forward pass before the stage's first update;
pi, pi_old and (for their KL term) pi_0 are all taken at the sampling temperature, and dropout
is off so that rho = 1 before the first update. `training.kl_coef` adds a k3 penalty to the
initial policy, the LoRA base with its adapter off. `training.loss_aggregation` chooses what a
step's summed loss is divided by. A non-finite loss or gradient stops the run before the
optimizer step (`NonFiniteLossError`): no NaN reaches the weights or a checkpoint.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from raftlm.config import GenerationConfig, TrainingConfig
from raftlm.errors import UserError
from raftlm.models.distributed import shard, shards_optimizer_state
from raftlm.run.progress import progress
from raftlm.training.batches import (
    IGNORE,
    Example,
    collate,
    response_log_probs,
    sequences,
    token_nll,
)
from raftlm.training.losses import aggregate, step_denominator
from raftlm.training.objectives import (
    objective_of,
    sampler_gap,
    sampling_mismatch,
    token_loss,
    token_tensors,
    training_temperature,
)
from raftlm.training.pairs import PAIR_STATS, pair_metrics, set_reference_log_probs


class NonFiniteLossError(UserError, ValueError):
    """A training step's loss or gradient is inf or NaN; the step was not applied (one line on
    the command line: the run diverged, lower the learning rate or check the rewards)."""


def disable_dropout(model: Any) -> None:
    """Dropout off in every module (TRL's disable_dropout): train-mode log-probs then equal the
    eval-mode ones pi_old was computed with, so rho = 1 before the first update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # HF attention passes it to the attention kernel


def planned_optimizer_steps(examples_per_stage: int, stages: int, config: TrainingConfig) -> int:
    """Schedule horizon for the whole run, from the nominal number of selected examples."""
    per_step = config.micro_batch_size * config.gradient_accumulation_steps
    return max(1, stages * config.epochs * math.ceil(examples_per_stage / per_step))


class PolicyTrainer:
    """AdamW + schedule + clipping over the run; `train(examples)` runs one stage's epochs."""

    def __init__(
        self,
        model: Any,
        config: TrainingConfig,
        total_steps: int,
        accelerator: Accelerator,
        pad_id: int,
        seed: int,
        generation: GenerationConfig | None = None,
    ):
        self.config = config
        self.accelerator = accelerator
        self.pad_id = pad_id
        self.seed = seed
        generation = generation or GenerationConfig()
        self.objective = objective_of(config)
        # pi (and pi_0 in the KL term) at the temperature pi_old was recorded at.
        self.temperature = training_temperature(config, generation.temperature)
        self.norm_tokens = config.loss_norm_tokens or generation.max_new_tokens
        if self.objective.loss.uses_ratio or config.kl_coef > 0 or self.objective.loss.paired:
            disable_dropout(model)
            warning = sampling_mismatch(config, generation.temperature, generation.top_p,
                                        generation.top_k)
            if warning and accelerator.is_main_process:
                print(f"warning: {warning}", flush=True)
        deepspeed = accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            # DeepSpeed insists on a micro-batch size; raftlm feeds it no dataloader to infer it.
            deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        # The scheduler is stepped by us, once per optimizer step: accelerate's wrapper would
        # step it once per process, which breaks a run-wide horizon under data parallelism.
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=total_steps,
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.step = 0
        self._stats: dict[str, float] = {}
        self._gap: dict[str, float] = {}  # train/pi_old_* of the stage (old_log_probs recompute)
        self._stage = 0
        # training.start: restart: the trainable weights every stage starts from (the builder
        # sets them, `raftlm.stage.build.initial_weights`); None: each stage continues.
        self.initial_weights: dict[str, torch.Tensor] | None = None

    def train(self, examples: list[Example], stage: int) -> dict[str, float]:
        """E epochs over the stage's examples (identical on every process, each taking its share
        of every optimizer step); returns stage statistics."""
        cfg, acc = self.config, self.accelerator
        self._gap = {}
        if self.objective.loss.uses_ratio:
            examples = self._with_old_log_probs(examples)
        if self.objective.loss.paired:  # the reference, once per stage (every process: FSDP)
            with self._autocast():
                set_reference_log_probs(self.accelerator.unwrap_model(self.model), examples,
                                        self.pad_id, self.accelerator.device, cfg)
        self._stats = {"clipped": 0.0, "ratio_sum": 0.0, "ratio_max": 0.0, "tokens": 0.0,
                       "kl": 0.0, **dict.fromkeys(PAIR_STATS, 0.0)}
        self._stage = stage
        self.model.train()
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(examples) / per_step) if examples else 0
        total_nll, total_tokens, total_denominator, norms = 0.0, 0, 0, []
        bar = progress(
            total=steps_per_epoch * cfg.epochs, desc=f"train stage {stage}", unit="step",
            leave=False, disable=not acc.is_main_process,
        )
        for epoch in range(cfg.epochs):
            order = list(examples)
            random.Random(f"{self.seed}:{stage}:{epoch}").shuffle(order)
            for start in range(0, len(order), per_step):
                step_examples = order[start : start + per_step]
                nll, tokens, denominator, norm = self._optimizer_step(step_examples)
                total_nll, total_tokens = total_nll + nll, total_tokens + tokens
                total_denominator += denominator
                norms.append(norm)
                bar.update(1)
                bar.set_postfix(loss=f"{nll / max(denominator, 1):.4f}")
        bar.close()
        # Each process summed the NLL of its own share; the loss is over the whole set.
        total_nll = float(acc.reduce(torch.tensor(total_nll, device=acc.device), "sum"))
        return {
            "train/loss": total_nll / max(total_denominator, 1),
            "train/optimizer_steps": self.step,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": float(np.mean(norms)) if norms else 0.0,
            "tokens/trained": total_tokens,
            **self._objective_stats(),
            **self._gap,
        }

    def _with_old_log_probs(self, examples: list[Example]) -> list[Example]:
        """The examples with pi_old filled in where the sampler did not record it (or for all
        of them with `training.old_log_probs: recompute`): the current policy before this
        stage's first update (every process computes all of them, so that FSDP's collectives
        stay in step). Recomputing also measures the sampler-training gap and, with
        `training.rollout_correction`, sets each example's correction weights."""
        recompute = self.config.old_log_probs == "recompute"
        todo = [e for e in examples
                if recompute or getattr(e, "old_log_probs", None) is None]
        if todo:
            model = self.accelerator.unwrap_model(self.model)
            with self._autocast():
                computed = response_log_probs(model, todo, self.pad_id,
                                              self.config.micro_batch_size,
                                              self.accelerator.device, self.temperature)
            if recompute:
                self._gap = sampler_gap(todo, computed, self.config)
            for example, log_probs in zip(todo, computed):
                example.old_log_probs = log_probs.tolist()
        return examples

    def _objective_stats(self) -> dict[str, float]:
        """Ratio and KL statistics of the stage's passes, over the tokens of all processes."""
        cfg, acc, s = self.config, self.accelerator, self._stats
        sums = acc.reduce(torch.tensor([s["clipped"], s["ratio_sum"], s["tokens"], s["kl"]],
                                       device=acc.device), "sum").tolist()
        clipped, ratio_sum, tokens, kl = sums
        stats = {}
        if self.objective.loss.uses_ratio and tokens:
            ratio_max = float(acc.gather(torch.tensor([s["ratio_max"]], device=acc.device)).max())
            stats.update({"train/clip_fraction": clipped / tokens,
                          "train/ratio_mean": ratio_sum / tokens, "train/ratio_max": ratio_max})
        if cfg.kl_coef > 0 and tokens:
            stats["train/kl_penalty"] = kl / tokens
        if self.objective.loss.paired:
            stats.update(pair_metrics(acc, s))
        return stats

    def _optimizer_step(self, step_examples: list[Example]) -> tuple[float, int, int, float]:
        """One optimizer step on `step_examples` (the whole step's batch, identical on every
        process); returns this process's loss sum (the NLL for sft), the step's token count,
        what the loss sum is divided by (tokens or responses) and the grad norm."""
        cfg, acc = self.config, self.accelerator
        mine = shard(step_examples)
        local_tokens = sum(len(e.response_ids) for e in mine)
        # Normalise by the step's token count over all processes so the gradient is that of
        # the token-pooled mean; DDP averages over processes, hence the num_processes factor.
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), "sum"))
        denominator = step_denominator(cfg.loss_aggregation, global_tokens, len(step_examples))
        scale = acc.num_processes / max(denominator, 1)
        # Every process runs as many micro-batches as the largest share needs: DDP (buffer
        # broadcast) and FSDP (all-gathers) join collectives in each forward. A process short
        # of examples fills its slots with zero-weighted passes over a stand-in example.
        largest = math.ceil(len(step_examples) / acc.num_processes)
        n_micro = max(1, math.ceil(largest / cfg.micro_batch_size))
        step_loss = 0.0
        for i in range(n_micro):
            chunk = mine[i * cfg.micro_batch_size : (i + 1) * cfg.micro_batch_size]
            weight = scale if chunk else 0.0
            chunk = chunk or step_examples[:1]
            batch = {k: v.to(acc.device) for k, v in collate(sequences(chunk),
                                                             self.pad_id).items()}
            sync = i == n_micro - 1
            # DeepSpeed steps inside backward unless told the step is not over yet.
            acc.sync_gradients = sync
            with nullcontext() if sync else acc.no_sync(self.model):
                with self._autocast():
                    loss_sum = self._loss(batch, chunk, bool(weight),
                                          denominator / len(step_examples))
                acc.backward(loss_sum * weight)
            step_loss += float(loss_sum.detach()) if weight else 0.0
        # max_norm = inf measures without clipping (the norm is over all processes' shards).
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        # Under DeepSpeed the clipping is its own (`gradient_clipping`); this reads the norm.
        norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm) or 0.0)
        self._check_finite(step_loss, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return step_loss, global_tokens, denominator, norm  # measured, clipped or not

    def _check_finite(self, step_loss: float, norm: float) -> None:
        """Stop before the optimizer step when any process's loss or the gradient is not
        finite (every process reaches the same verdict, so none waits in a collective)."""
        acc = self.accelerator
        bad = torch.tensor([not math.isfinite(step_loss), not math.isfinite(norm)],
                           dtype=torch.float32, device=acc.device)
        bad_loss, bad_grad = (bool(v) for v in acc.reduce(bad, "sum").tolist())
        if bad_loss or bad_grad:
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if bad_loss else "gradient"
            raise NonFiniteLossError(
                f"stage {self._stage}: the training {what} is not finite at optimizer step "
                f"{self.step + 1} (training.objective={self.config.objective}); stopped "
                "before the update, the weights and checkpoints are unchanged")

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        """Mixed precision for one forward: accelerate's (`model.dtype`), plus bf16 autocast
        with `training.bf16_autocast`. Entered per forward, never around several optimizer
        steps: autocast keeps its bf16 copy of each trainable weight until the context exits,
        so a longer context would keep computing with the weights of its first forward."""
        device = self.accelerator.device.type
        with self.accelerator.autocast(), torch.autocast(
                device, dtype=torch.bfloat16, enabled=self.config.bf16_autocast):
            yield

    def _loss(self, batch: dict[str, torch.Tensor], chunk: list[Example], count: bool,
              per_example: float) -> torch.Tensor:
        """The objective's loss on one micro-batch, aggregated as `training.loss_aggregation`
        says (the step divides it by `step_denominator`, `per_example` times its examples);
        with `count`, its ratio, KL or pair statistics are added to the stage's."""
        cfg = self.config
        nll = token_nll(self.model, batch, self.temperature)
        mask = (batch["labels"][:, 1:] != IGNORE).float()
        if self.objective.loss.paired:
            loss, stats = self.objective.loss.paired(-nll, mask, chunk, cfg, per_example)
            if count:
                for key, value in stats.items():
                    self._stats[key] += value
            return loss
        if (self.objective.loss.plain_nll and cfg.kl_coef == 0
                and cfg.loss_aggregation == "token_mean"):
            if count:
                self._stats["tokens"] += float(mask.sum())
            return nll.sum()  # exactly the SFT loss raftlm always had
        tensors = {k: v.to(nll.device) for k, v in token_tensors(chunk, nll.shape[1]).items()}
        tensors["mask"] = mask
        if cfg.kl_coef > 0:
            tensors["ref_log_probs"] = self._reference_log_probs(batch)
        loss, stats = token_loss(cfg, -nll, tensors)
        if count:
            for key, value in stats.items():
                if key == "ratio_max":
                    self._stats[key] = max(self._stats[key], value)
                else:
                    self._stats[key] += value
        return aggregate(loss, mask, cfg.loss_aggregation, self.norm_tokens)

    @torch.no_grad()
    def _reference_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log pi_0 of every next token (at the training temperature): the same model with its
        LoRA adapter disabled (config validation refuses kl_coef > 0 without LoRA, so no second
        copy of the weights)."""
        model = self.accelerator.unwrap_model(self.model)
        with model.disable_adapter():
            return -token_nll(model, batch, self.temperature)

    def restart(self, n_examples: int) -> None:
        """`training.start: restart`, before a stage's training: the trainable weights back to
        `initial_weights`, AdamW's moments and step counts dropped, and a new schedule (warm-up
        included) over this stage's `n_examples`. `step` keeps counting the run's steps."""
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(self.initial_weights[name])
        optimizer = self.optimizer.optimizer  # the one accelerate wraps
        optimizer.state.clear()
        self.scheduler = get_scheduler(
            self.config.lr_scheduler, optimizer,
            num_warmup_steps=self.config.warmup_steps,
            num_training_steps=planned_optimizer_steps(n_examples, 1, self.config))

    def set_sampling_temperature(self, temperature: float) -> None:
        """The stage's sampling temperature (`generation.temperature` may change per stage):
        ratio objectives train pi (and pi_0) at the temperature pi_old was recorded at."""
        self.temperature = training_temperature(self.config, temperature)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and step. A collective under FSDP (all processes call it)."""
        return {
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]

    def _optimizer_state(self) -> dict[str, Any] | None:
        if not shards_optimizer_state(self.accelerator):
            return self.optimizer.state_dict()  # identical on every process
        if self.accelerator.is_fsdp2:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=options)
        return None  # DeepSpeed partitions it; see _load_optimizer_state

    def _load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        if not shards_optimizer_state(self.accelerator):
            self.optimizer.load_state_dict(state)
        elif self.accelerator.is_fsdp2:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_optimizer_state_dict(self.model, self.optimizer.optimizer, state, options=options)
        elif self.accelerator.is_main_process:
            print("warning: DeepSpeed run resumed without its optimizer moments (AdamW restarts "
                  "from zero; weights, schedule, prompt order and RNG are restored)", flush=True)
