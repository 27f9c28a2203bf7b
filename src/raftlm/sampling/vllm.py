"""Sampling with vLLM: `generation.backend: vllm` (`pip install raftlm[vllm]`, a CUDA GPU).

`generate_vllm` keeps the contract of `raftlm.sampling.generate.generate`: token-id prompts in, K
`Completion`s per prompt out, with the eos or the token completing a stop string kept in
`token_ids` (so SFT learns to stop), and one seed per prompt (`SamplingParams.seed`) so a prompt's
samples do not depend on its batch. They differ from the raftlm sampler's: another RNG.

The engine (one per process, on its own GPU) is built at the first call from the policy's base
model folder and kept for the run: building it costs tens of seconds. Before every call the
policy's current weights reach it:

- LoRA: the adapter is saved to a temporary folder and sent as a new `LoRARequest` (vLLM caches
  adapters by id, so every sync gets the next id). Works with any `vllm.tensor_parallel_size`.
- Full fine-tuning: the weights are copied in place into the engine's model (`load_weights`
  through `LLM.collective_rpc`, as TRL's colocate mode does). That needs the engine inside this
  process, i.e. `vllm.tensor_parallel_size: 1`.

With several processes each runs its own engine (vLLM's `external_launcher` inside the
`accelerate launch` processes) on its shard of the prompts; tensor parallelism is then 1.
The engine reserves `vllm.gpu_memory_utilization` of the GPU for weights and KV cache next to
the training policy for the whole run; size it (and the policy) to fit together.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raftlm.config import ConfigError, GenerationConfig
from raftlm.models.loading import is_lora
from raftlm.sampling.completion import Completion, eos_token_ids

VLLM_NEEDED = "generation.backend=vllm needs `pip install raftlm[vllm]` and a CUDA GPU"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def check_vllm_available() -> None:
    """Raise a ConfigError saying what the vLLM backend misses here."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise ConfigError(f"{VLLM_NEEDED} ({'; '.join(missing)})")


def sampling_params_kwargs(config: GenerationConfig, num_samples: int, seed: int, *,
                           greedy: bool, max_new_tokens: int, eos_ids: set[int]) -> dict[str, Any]:
    """`vllm.SamplingParams` arguments for one prompt (a pure mapping of raftlm's settings)."""
    common: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "stop_token_ids": sorted(eos_ids),
        "stop": list(config.stop_strings) or None,
        "include_stop_str_in_output": True,  # raftlm's text ends with the stop string
        "seed": seed,
    }
    if greedy:  # identical samples: decode once, copy (as the hf backend does)
        return {**common, "n": 1, "temperature": 0.0}
    return {**common, "n": num_samples, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k if config.top_k > 0 else -1}


def engine_kwargs(config: GenerationConfig, folder: str, lora_rank: int | None,
                  num_processes: int) -> dict[str, Any]:
    """`vllm.LLM` arguments for the policy's base model `folder`."""
    tp = config.vllm.tensor_parallel_size
    if num_processes > 1 and tp != 1:
        raise ValueError(
            f"generation.vllm.tensor_parallel_size: expected 1 with {num_processes} processes "
            f"(each process runs its own engine on its shard of the prompts), got {tp}"
        )
    kwargs: dict[str, Any] = {
        "model": folder, "tokenizer": folder, "dtype": "auto", "tensor_parallel_size": tp,
        "gpu_memory_utilization": config.vllm.gpu_memory_utilization, "seed": 0,
        # An agent's next turn is its trajectory so far plus an observation: the engine reuses
        # the KV blocks of the prefix it already computed (raftlm's sampler: `keep_kv`).
        "enable_prefix_caching": True,
    }
    if tp == 1:
        # In-process engine: weights can be loaded in place, and it runs inside torchrun's
        # processes without spawning its own.
        kwargs["distributed_executor_backend"] = "external_launcher"
    if lora_rank is not None:
        supported = [r for r in LORA_RANKS if r >= lora_rank]
        if not supported:
            raise ValueError(f"model.lora.r: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, "
                             f"got {lora_rank}")
        kwargs.update(enable_lora=True, max_lora_rank=supported[0], max_loras=1)
    return kwargs


def to_completion(tokenizer: Any, token_ids: Sequence[int], finish_reason: str | None,
                  stop_reason: int | str | None, stops: Sequence[str],
                  eos_ids: set[int]) -> Completion:
    """A raftlm `Completion` from one vLLM `CompletionOutput`'s fields."""
    ids = list(token_ids)
    if finish_reason == "length":
        reason = "length"
    elif isinstance(stop_reason, str):
        reason = "stop_string"
    else:
        reason = "eos"
        if not ids or ids[-1] not in eos_ids:
            # Keep the stop token: SFT on the response must learn where it ends.
            ids.append(stop_reason if isinstance(stop_reason, int) else min(eos_ids))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if reason == "stop_string":
        ends = [text.find(s) + len(s) for s in stops if s in text]
        text = text[: min(ends)] if ends else text
    return Completion(text=text, token_ids=ids, finish_reason=reason)


def generate_vllm(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    num_samples: Sequence[int],
    config: GenerationConfig,
    *,
    seeds: Sequence[int],
    greedy: bool = False,
    desc: str = "generate",
    max_new_tokens: int | None = None,
) -> list[list[Completion]]:
    """`raftlm.sampling.generate.generate` on vLLM, with the policy's current weights;
    ``num_samples[i]`` completions of prompt i."""
    check_vllm_available()
    from vllm import SamplingParams

    # Even with an empty shard: building the engines is a collective across processes.
    engine = _engine_for(model, config)
    lora_request = engine.sync(model)
    if not prompts:
        return []
    eos_ids = eos_token_ids(model, tokenizer)
    max_new = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
    wanted = [i for i, count in enumerate(num_samples) if count > 0]  # vLLM refuses n=0
    params = [
        SamplingParams(**sampling_params_kwargs(config, num_samples[i], seeds[i], greedy=greedy,
                                                max_new_tokens=max_new, eos_ids=eos_ids))
        for i in wanted
    ]
    outputs = engine.llm.generate(
        [{"prompt_token_ids": list(prompts[i])} for i in wanted], params,
        lora_request=lora_request, use_tqdm=_is_main_process(),
    ) if wanted else []
    results: list[list[Completion]] = [[] for _ in prompts]
    for i, output in zip(wanted, outputs, strict=True):
        row = [to_completion(tokenizer, c.token_ids, c.finish_reason, c.stop_reason,
                             config.stop_strings, eos_ids) for c in output.outputs]
        results[i] = row * num_samples[i] if greedy else row
    return results


class _Engine:
    """One vLLM engine and the way the policy's weights reach it."""

    def __init__(self, kwargs: dict[str, Any]):
        from vllm import LLM

        _set_launcher_env()
        self.llm = LLM(**kwargs)
        self.in_process = kwargs.get("distributed_executor_backend") == "external_launcher"
        self.adapters = Path(tempfile.mkdtemp(prefix="raftlm-vllm-lora-"))
        self.syncs = 0

    def sync(self, model: Any) -> Any:
        """Send the policy's current weights; returns the LoRARequest to generate with."""
        self.syncs += 1
        if is_lora(model):
            from vllm.lora.request import LoRARequest

            folder = self.adapters / f"sync-{self.syncs}"
            adapter = _full_tensors(model, lambda name: "lora_" in name)
            model.save_pretrained(folder, safe_serialization=True, state_dict=adapter)
            shutil.rmtree(self.adapters / f"sync-{self.syncs - 1}", ignore_errors=True)
            return LoRARequest(f"policy-{self.syncs}", self.syncs, str(folder))
        if not self.in_process:
            raise NotImplementedError(
                "generation.backend=vllm with full fine-tuning loads the weights into the engine "
                "in place, which needs generation.vllm.tensor_parallel_size: 1 (or use LoRA)"
            )
        weights = list(_full_tensors(model, lambda name: True).items())
        self.llm.collective_rpc(_load_weights, args=(weights,))
        return None


def _full_tensors(model: Any, keep: Any) -> dict[str, torch.Tensor]:
    """The model's state dict entries named by `keep`, as whole tensors. Under FSDP2 they are
    DTensor shards: gathering them is a collective, which every process reaches at the same
    sampling calls."""
    from torch.distributed.tensor import DTensor

    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach()
            for name, value in model.state_dict().items() if keep(name)}


def _load_weights(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights=weights)  # HF parameter names


_ENGINES: dict[tuple, _Engine] = {}


def _engine_for(model: Any, config: GenerationConfig) -> _Engine:
    from accelerate import PartialState

    folder = _base_folder(model)
    lora_rank = _lora_rank(model)
    kwargs = engine_kwargs(config, folder, lora_rank, PartialState().num_processes)
    key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
    if key not in _ENGINES:
        _ENGINES[key] = _Engine(kwargs)
    return _ENGINES[key]


def _base_folder(model: Any) -> str:
    """The local folder the policy's base weights were loaded from."""
    if is_lora(model):
        return model.peft_config[model.active_adapter].base_model_name_or_path
    return model.config._name_or_path


def _lora_rank(model: Any) -> int | None:
    return model.peft_config[model.active_adapter].r if is_lora(model) else None


def _set_launcher_env() -> None:
    """vLLM's external launcher reads torchrun's variables; a plain single process has none."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in-process
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process
