"""Wiring: build every component a RAFT run needs from its config (or from a checkpoint).

Every command builds through it, so a checkpoint means the same thing to all of them."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType

from raftlm.agents import check_rollout
from raftlm.config import ConfigError, RaftConfig
from raftlm.config.evaluation import EvalSet
from raftlm.data.anchor import AnchorRow, load_anchor
from raftlm.data.prompts import PromptOrder, PromptSet, load_prompt_sets
from raftlm.errors import InvalidInput
from raftlm.evaluation.evaluate import evaluate
from raftlm.models.distributed import full_state_dict, process_state, whole_model
from raftlm.models.loading import load_policy, merged_adapter, resolve_dtype, save_policy
from raftlm.models.offload import OffloadedReward, PhaseOffload
from raftlm.rewards.reward import Reward, build_reward
from raftlm.run.checkpoint import read_trainer_state
from raftlm.run.lock import run_lock
from raftlm.run.rundir import RunDir
from raftlm.run.threads import configure_threads
from raftlm.run.tracking import Tracker
from raftlm.sampling.generate import GENERATION_BACKENDS
from raftlm.sampling.teacher import Teacher, build_teacher, check_teacher
from raftlm.stage.collectors import collector
from raftlm.stage.hints import check_hint_answers
from raftlm.stage.replay import check_stage_settings, planned_examples
from raftlm.training.objectives import check_objective_config
from raftlm.training.trainer import PolicyTrainer, planned_optimizer_steps


@dataclass
class Run:
    """The live state of a RAFT run: components plus where the loop stands."""

    config: RaftConfig
    run_dir: RunDir
    accelerator: Accelerator
    tokenizer: Any
    trainer: PolicyTrainer
    reward: Reward  # under `offload: phases`, wrapped so that it takes turns with the policy
    train_prompts: PromptSet
    eval_prompts: PromptSet | None
    prompt_order: PromptOrder  # which training prompts the next stage draws
    tracker: Tracker
    start_stage: int  # first stage still to run (1 for a fresh run)
    baseline_done: bool = False  # stage 0's evaluation is recorded (a resume kept it)
    anchor: list[AnchorRow] | None = None  # data.anchor's rows, tokenized
    teacher: Teacher | None = None  # `generation.teacher` (a local one stays loaded)

    def at_stage(self, stage: int) -> Run:
        """This run as stage `stage` sees it: its config with every per-stage schedule at the
        stage's value (`RaftConfig.at_stage`), the same components."""
        return dataclasses.replace(self, config=self.config.at_stage(stage))

    @property
    def policy(self) -> Any:
        """The model to sample from (unwrapped from DDP, still under mixed-precision autocast)."""
        return self.accelerator.unwrap_model(self.trainer.model)

    def whole_policy(self) -> Any:
        """`with run.whole_policy() as policy:` the policy with all its weights on this process,
        to sample or score on its own (see `raftlm.models.distributed.whole_model`)."""
        return whole_model(self.accelerator, self.trainer.model)

    @contextmanager
    def sampling_policy(self) -> Iterator[Any]:
        """`with run.sampling_policy() as policy:` the whole policy with its LoRA adapter
        merged into the weights, the fastest form to sample from."""
        with self.whole_policy() as whole, merged_adapter(whole) as policy:
            yield policy


def prepare_run(config: RaftConfig, resume: bool = False) -> Run:
    """Create (or reopen, with `resume`) the run directory and build every component."""
    set_threads(config)
    check_objective_config(config)
    collector(config.raft.collector).check(config)
    check_stage_settings(config)
    check_teacher(config)
    GENERATION_BACKENDS[config.generation.backend].check_available()  # before any model loads
    previous = previous_config(RunDir(config.run.output_dir)) if resume else None
    if previous is not None:
        check_continues(previous, config, config.run.output_dir)
    accelerator, dtype = make_accelerator(config)
    _check_offload(config, accelerator)
    _check_restart(config, accelerator)
    run_dir, checkpoint = open_run_dir(config, accelerator, resume)
    model, tokenizer = build_policy(config, accelerator.device, dtype, checkpoint)
    initial = initial_weights(config, model, checkpoint, accelerator.device, dtype) if (
        config.training.start == "restart") else None
    check_rollout(config, tokenizer)  # a tool or template that cannot work: now, not at stage 1
    train_prompts, eval_prompts = load_prompt_sets(config, tokenizer)
    check_hint_answers(config, train_prompts)
    trainer = build_trainer(config, model, accelerator, tokenizer.pad_token_id)
    trainer.initial_weights = initial
    prompt_order = PromptOrder(len(train_prompts), config.run.seed)
    start_stage = 1
    if checkpoint is not None:
        start_stage = restore(checkpoint, trainer, prompt_order) + 1
    # Metrics of stages after the checkpoint are redone. Before the first checkpoint, the
    # baseline evaluation is kept when it was made under this evaluation config (on a large
    # set it is the costliest part of an early interruption); otherwise everything is redone.
    same_evaluation = previous is not None and (
        previous.get("evaluation") == config.to_dict()["evaluation"])
    if accelerator.is_main_process and resume:
        run_dir.truncate_metrics(start_stage - 1 if checkpoint is not None
                                 else 0 if same_evaluation else -1)
    accelerator.wait_for_everyone()
    baseline_done = start_stage == 1 and any(r.get("stage") == 0
                                             for r in run_dir.read_metrics())
    tracker = Tracker(run_dir, config.tracking, enabled=accelerator.is_main_process)
    return Run(
        config=config, run_dir=run_dir, accelerator=accelerator, tokenizer=tokenizer,
        trainer=trainer, reward=build_offloaded_reward(config, trainer),
        train_prompts=train_prompts, eval_prompts=eval_prompts, prompt_order=prompt_order,
        tracker=tracker, start_stage=start_stage, baseline_done=baseline_done,
        anchor=load_anchor(config, tokenizer),
        teacher=build_teacher(config, tokenizer, accelerator.device, dtype),
    )


def set_threads(config: RaftConfig) -> None:
    """`run.threads` CPU threads (0: torch's default; `raftlm.run.threads`)."""
    configure_threads(config.run.threads or None)


def make_accelerator(config: RaftConfig) -> tuple[Accelerator, torch.dtype]:
    """This process's Accelerator (mixed precision from `model.dtype`) and the model dtype."""
    state = process_state()
    dtype = resolve_dtype(config.model.dtype, state.device)
    accelerator = Accelerator(cpu=state.device.type == "cpu",
                              mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    return accelerator, dtype


def open_run_dir(config: RaftConfig, accelerator: Accelerator, resume: bool
                 ) -> tuple[RunDir, tuple[int, Path] | None]:
    """Create the run directory (or reopen it, with `resume`: then also its newest intact
    checkpoint) and write the resolved config into it."""
    run_dir = RunDir(config.run.output_dir)
    checkpoint = None
    if resume:
        warn = print if accelerator.is_main_process else (lambda line: None)
        checkpoint = run_dir.intact_checkpoint(warn)
    if resume and accelerator.is_main_process:
        run_dir.remove_temporaries()  # of the process that was killed
        _remove_other_journals(run_dir, checkpoint[0] + 1 if checkpoint else 1)
        if checkpoint and checkpoint == run_dir.checkpoints()[-1]:  # none damaged after it
            run_dir.remove_old_checkpoints(config.run.keep_checkpoints)  # a kill's leftovers
    if not resume and accelerator.is_main_process:
        RunDir.create(config.run.output_dir, overwrite=config.run.overwrite)
        run_dir.remove_temporaries()  # of a start-up that was killed before config.yaml
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.write_config(config.to_yaml())
    return run_dir, checkpoint


# What a resumed run must share with the run it continues: its checkpoints were trained from
# this model and its samples drawn for these prompts in this order. (Knobs that change only
# speed, like model.cache_dir, may change; raft.stages may grow.)
CONTINUED = ("model.path", "model.gguf_file", "model.dtype", "model.lora", "data", "run.seed",
             "raft.prompts_per_stage", "raft.samples_per_prompt")


def previous_config(run_dir: RunDir) -> dict[str, Any] | None:
    """The config a run directory was last run with (its config.yaml), or None."""
    if not run_dir.config_path.is_file():
        return None
    return yaml.safe_load(run_dir.config_path.read_text()) or {}


def check_continues(before: dict[str, Any], config: RaftConfig, root: str | Path) -> None:
    """Refuse, in one line naming the settings, a resume whose config would continue another
    run: another model, dtype, adapter, prompt source, system prompt or seed."""
    now = config.to_dict()
    differ = [name for name in CONTINUED if _dotted(before, name) != _dotted(now, name)]
    if differ:
        raise ConfigError(
            f"--resume {root}: the run was started with other {', '.join(differ)}; "
            "resuming would continue its checkpoints and samples under these (start a new run "
            "with another run.output_dir, or resume with the run's own config.yaml)")


def _dotted(tree: dict, name: str) -> Any:
    for part in name.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def build_policy(config: RaftConfig, device: torch.device, dtype: torch.dtype,
                 checkpoint: tuple[int, Path] | None = None) -> tuple[Any, Any]:
    """The trainable policy (seeded: a fresh LoRA adapter is initialised from the run seed) and
    its tokenizer; from a checkpoint's adapter or full model when one is given."""
    model_config, adapter_from = config.model, None
    if checkpoint is not None:
        policy_dir = checkpoint[1] / "policy"
        if config.model.lora.enabled:
            adapter_from = policy_dir
        else:  # a full fine-tune's checkpoint is itself a complete model folder
            model_config = dataclasses.replace(config.model, path=str(policy_dir), gguf_file=None)
    _seed_everything(config.run.seed)
    return load_policy(model_config, device, dtype, adapter_from)


def build_trainer(config: RaftConfig, model: Any, accelerator: Accelerator, pad_id: int
                  ) -> PolicyTrainer:
    """AdamW and the learning-rate schedule over the whole run's planned steps."""
    total_steps = sum(planned_optimizer_steps(planned_examples(config, stage), 1, config.training)
                      for stage in range(1, config.raft.stages + 1))
    return PolicyTrainer(model, config.training, total_steps, accelerator, pad_id, config.run.seed,
                         generation=config.at_stage(1).generation)


def initial_weights(config: RaftConfig, model: Any, checkpoint: tuple[int, Path] | None,
                    device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`training.start: restart`: the initial policy's trainable weights (a LoRA adapter as
    first initialised, or all weights), kept on the CPU: `model`'s own in a fresh run, rebuilt
    as a fresh run builds them (seeded) when `model` comes from a checkpoint."""
    if checkpoint is not None:
        model, _ = build_policy(config, device, dtype)
    return {name: param.detach().to("cpu", copy=True)
            for name, param in model.named_parameters() if param.requires_grad}


def restore(checkpoint: tuple[int, Path], trainer: PolicyTrainer, prompt_order: PromptOrder) -> int:
    """Load a checkpoint's optimizer, schedule, RNG and prompt cursor; returns its stage."""
    stage, path = checkpoint
    trainer_state = read_trainer_state(path)
    trainer.load_state_dict(trainer_state)
    _restore_rng(trainer_state["rng"])
    prompt_order.load_state_dict(checkpoint_prompt_order(path))
    return stage


def checkpoint_prompt_order(path: Path) -> dict[str, Any]:
    """The prompt cursor a checkpoint folder holds (`PromptOrder.state_dict`)."""
    state = json.loads((path / "state.json").read_text())
    return state["prompt_order"] if "prompt_order" in state else state["sampler"]  # before rename


def build_offloaded_reward(config: RaftConfig, trainer: PolicyTrainer) -> Reward:
    """The configured reward; under `offload: phases`, wrapped so that its models take turns
    with the policy (and its optimizer state) on the accelerator."""
    reward = build_reward(config.reward)
    accelerator = trainer.accelerator
    offload = PhaseOffload(accelerator.device, accelerator.unwrap_model(trainer.model),
                           trainer.optimizer, reward.models(), config.offload == "phases")
    return OffloadedReward(reward, offload) if offload.enabled else reward


@contextmanager
def exclusive_run_dir(config: RaftConfig) -> Iterator[None]:
    """One writer per run directory (`raftlm.run.lock`): the main process holds its lock."""
    with run_lock(config.run.output_dir) if process_state().is_main_process else nullcontext():
        yield


def _remove_other_journals(run_dir: RunDir, first_stage: int) -> None:
    # Earlier stages are checkpointed (a kill came before their journal was deleted); later
    # ones were sampled from a policy this run trains again.
    for path in (run_dir.root / "stages").glob("*/journal.rank*.jsonl"):
        if int(path.parent.name) != first_stage:
            path.unlink()


def save_checkpoint(run: Run, stage: int) -> Path | None:
    """Policy, optimizer/schedule, prompt cursor and RNG state after `stage`, written by the
    main process (every process calls this: gathering sharded weights is a collective)."""
    return write_checkpoint(run.trainer, run.tokenizer, run.prompt_order, run.run_dir, stage,
                            run.config.run.keep_checkpoints)


def write_checkpoint(trainer: PolicyTrainer, tokenizer: Any, prompt_order: PromptOrder,
                     run_dir: RunDir, stage: int, keep: int) -> Path | None:
    """`save_checkpoint` from the parts it writes (`raftlm finetune` has no whole `Run`)."""
    accelerator = trainer.accelerator
    weights = full_state_dict(accelerator, trainer.model)
    trainer_state = {**trainer.state_dict(), "rng": _rng_state()}
    path = None
    if accelerator.is_main_process:
        state = {"stage": stage, "prompt_order": prompt_order.state_dict()}
        policy = accelerator.unwrap_model(trainer.model)
        path = run_dir.save_checkpoint(
            stage,
            lambda folder: save_policy(policy, tokenizer, folder, weights),
            trainer_state,
            state,
            keep=keep,
        )
    # Nobody starts the next stage (or resumes) before the checkpoint is complete.
    accelerator.wait_for_everyone()
    return path


def evaluate_checkpoint(config: RaftConfig, checkpoint: Path | None = None,
                        sets: list[EvalSet] | None = None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of the base model (no checkpoint) or of a run's checkpoint folder, and one row
    per prompt: on `sets` alone when given, else on the held-out set and `evaluation.sets`."""
    set_threads(config)
    device = process_state().device
    policy, tokenizer = load_for_eval(config, checkpoint, device,
                                      resolve_dtype(config.model.dtype, device))
    held_out = None
    if sets is not None:
        config = dataclasses.replace(
            config, evaluation=dataclasses.replace(config.evaluation, sets=sets))
    else:
        _, held_out = load_prompt_sets(config, tokenizer)
    if held_out is None and not config.evaluation.sets:
        raise InvalidInput("no evaluation set: set data.eval_file (or use data.task) or "
                           "evaluation.sets, or give --preset / --file")
    # The run's reward is built (its models loaded) only where a set scores with it.
    scored = held_out is not None or any(
        "reward" in s.metrics or "reward" in s.extraction for s in config.evaluation.sets)
    reward = build_reward(config.reward) if scored else None
    metrics, items = evaluate(policy, tokenizer, held_out, reward, config)
    counts = {f"eval/{s.name}/prompts": sum(i["set"] == s.name for i in items)
              for s in config.evaluation.sets}
    held = {"eval/prompts": len(held_out)} if held_out is not None else {}
    return {"checkpoint": str(checkpoint) if checkpoint else None, **held, **counts,
            **metrics}, items


def load_for_eval(config: RaftConfig, checkpoint: Path | None, device: torch.device,
                  dtype: torch.dtype) -> tuple[Any, Any]:
    """The policy of `checkpoint` (a `checkpoints/stage-NNN` folder or its `policy/`): a LoRA
    adapter on the configured base, or a full model folder; the base model without one."""
    base = dataclasses.replace(config.model, gradient_checkpointing=False,
                               lora=dataclasses.replace(config.model.lora, enabled=False))
    if checkpoint is None:
        return load_policy(base, device, dtype)
    folder = checkpoint / "policy" if (checkpoint / "policy").is_dir() else checkpoint
    if (folder / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        model, tokenizer = load_policy(base, device, dtype)
        return PeftModel.from_pretrained(model, folder).eval(), tokenizer
    if (folder / "config.json").is_file():
        full = dataclasses.replace(base, path=str(folder), gguf_file=None)
        return load_policy(full, device, dtype)
    raise FileNotFoundError(f"{checkpoint}: no LoRA adapter (adapter_model.safetensors) or "
                            "model folder (config.json) in it or in its policy/")


def _check_restart(config: RaftConfig, accelerator: Accelerator) -> None:
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if config.training.start == "restart" and sharded:
        raise ConfigError("training.start: expected continue under FSDP or DeepSpeed (restart "
                          "copies whole initial weights into the parameters, which they shard), "
                          "got restart")


def _check_offload(config: RaftConfig, accelerator: Accelerator) -> None:
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if config.offload == "phases" and sharded:
        raise ConfigError(
            "offload: phases moves whole models between devices; under FSDP or DeepSpeed use "
            "their own offloading (fsdp_offload_params, offload_optimizer_device) instead"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
