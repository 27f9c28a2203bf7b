"""Memory mode `offload: phases`: the policy and the reward models never share the accelerator.

The policy (its weights and its optimizer state) stays on the accelerator for sampling and
training. Reward models stay in CPU memory and visit the accelerator only while they score;
for that time the policy and its optimizer state move out. The peak is then the larger of the
two phases instead of their sum, at the price of two host<->device copies of each per scoring
call (about a second per GB over PCIe).

Without offload (`offload: none`) reward models simply live on the accelerator next to the
policy. On a CPU-only machine there is one memory, so the mode moves nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the freed blocks back so the other phase can use them


class PhaseOffload:
    """Moves the policy and the reward models so that they take turns on `device`.

    `policy` is the unwrapped training module (DDP's wrapper holds the same parameters),
    `optimizer` its optimizer (AdamW moments live next to the parameters), `reward_models`
    anything with `.to(device)`: what the reward's terms say they hold (`Reward.models()` asks
    each term; a reward-model term names itself, a function or a remote term nothing).
    """

    def __init__(self, device: torch.device | str, policy: Any, optimizer: Any,
                 reward_models: list[Any], enabled: bool):
        self.device = torch.device(device)
        self.policy, self.optimizer, self.reward_models = policy, optimizer, reward_models
        self.enabled = enabled and bool(reward_models) and self.device.type != "cpu"
        self._moved_state: list[tuple[dict, str]] = []
        for model in reward_models:
            model.to("cpu" if self.enabled else self.device)

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """Reward models on the accelerator, the policy and its optimizer state off it."""
        if not self.enabled:
            yield
            return
        self._move_policy("cpu")
        for model in self.reward_models:
            model.to(self.device)
        try:
            yield
        finally:
            for model in self.reward_models:
                model.to("cpu")
            _empty_cache(self.device)
            self._move_policy(self.device)

    def _move_policy(self, target: torch.device | str) -> None:
        self.policy.to(target)
        # Module.to replaces each parameter's data in place, so the optimizer still holds
        # the same parameter objects; its state tensors have to follow by hand. Only those
        # that lived on the accelerator move back (AdamW keeps its step counters on the CPU).
        state = getattr(self.optimizer, "optimizer", self.optimizer).state
        if str(target) == "cpu":
            self._moved_state = [
                (entry, key) for entry in state.values() for key, value in entry.items()
                if torch.is_tensor(value) and value.device.type == self.device.type
            ]
        for entry, key in self._moved_state:
            entry[key] = entry[key].to(target)
        if str(target) == "cpu":
            _empty_cache(self.device)


class OffloadedReward:
    """A reward whose every call runs inside `offload.scoring()`: so every scoring site (the
    stage, the held-out evaluation) respects the phases without knowing about them."""

    def __init__(self, reward: Any, offload: PhaseOffload):
        self.reward, self.offload = reward, offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.offload.scoring():
            return self.reward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reward, name)  # terms, models(), on_error
