"""Data parallelism over processes (accelerate): who does which share, and gathering it back.

Every process runs the same program (`accelerate launch -m raftlm train ...`). In a stage each
process samples and scores a contiguous shard of the prompts; the candidates are gathered so that
every process ranks the same full table (a global top fraction, as in the paper) and trains on
the same selected set, each taking its share of every optimizer step (`PolicyTrainer`).

A sample's randomness comes from (run seed, stage, prompt id, sample index) alone, so the
candidates do not depend on the number of processes beyond floating-point noise.

Per-process sampling needs every weight on every process. DDP and DeepSpeed ZeRO-1/2 replicate
the weights anyway; under FSDP2 `whole_model` all-gathers them for the duration of a phase.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object

T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's process state, initialised so that a multi-process launch on a machine
    without an accelerator runs on CPU with gloo (accelerate would otherwise run every process
    alone, each a full copy of the run)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not _has_accelerator())


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of `n` items; shares differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of `items` (all of them in a single process)."""
    state = PartialState()
    start, end = shard_bounds(len(items), state.process_index, state.num_processes)
    return list(items[start:end])


def gather(local: Sequence[T]) -> list[T]:
    """Every process's list, concatenated in process order; `gather(shard(x)) == x`.
    A collective: every process must call it."""
    if PartialState().num_processes == 1:
        return list(local)
    return list(gather_object(list(local)))


@contextmanager
def whole_model(accelerator: Accelerator, model: Any) -> Iterator[Any]:
    """The prepared `model` as a module each process can run alone (sampling, log-probs of its
    own shard), never DDP's wrapper: its forward may join collectives the other processes skip.

    Under FSDP2 every weight is all-gathered for the duration (one full copy per process) and
    resharded on exit; edits made inside (e.g. a merged LoRA) are dropped with the copy.
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 shards the weights, but every process samples on its own: "
                "use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) or FSDP2"
            )
    if not (accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2):
        if accelerator.distributed_type == DistributedType.FSDP:
            raise NotImplementedError("raftlm supports FSDP through FSDP2 only: set "
                                      "fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
        yield unwrapped
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrapped.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        # Keep the gathered weights between forward calls: processes run different numbers
        # of them here, so nothing may all-gather again.
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield unwrapped
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_state_dict(accelerator: Accelerator, model: Any) -> dict[str, Any] | None:
    """The model's complete state dict for the main process to save; None where the model's own
    `save_pretrained` already sees every weight. A collective under FSDP: all processes call it."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.get_state_dict(model)
    return None


def shards_optimizer_state(accelerator: Accelerator) -> bool:
    """Whether each process holds only a part of the optimizer state (FSDP, DeepSpeed)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
