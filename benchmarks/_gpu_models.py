"""What `benchmarks/gpu_check.py` is built from: models, tokenizer, prompts, a reward, its
result rows and workload settings, memory readings.

Nothing is downloaded: the policies are randomly initialised Llama models of real sizes, the
reward model a random LlamaForSequenceClassification, the tokenizer a character-level WordLevel
tokenizer with a ChatML template, padded with synthetic tokens up to a realistic vocabulary.
"""

from __future__ import annotations

import gc
import json
import string
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]

# Llama-architecture shapes of real models (Qwen2.5-0.5B/1.5B widths, Llama-3.2-1B), tied
# embeddings. "tiny" is for the CPU test: its vocabulary is the tokenizer's base alphabet.
SIZES: dict[str, dict] = {
    "tiny": dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1b": dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "1.5b": dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}


def build_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """Character-level tokenizer, ChatML specials, eos = pad = <|im_end|>; padded with
    synthetic tokens `<xN>` up to `vocab_size`. Every token round-trips (encode(decode(ids)))."""
    base = SPECIAL + list(string.printable)
    extra = [f"<x{i}>" for i in range(max(0, vocab_size - len(base)))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(base + extra)},
                                      unk_token="<unk>"))
    one_token = Regex(r"<x\d+>|<\|im_(?:start|end)\|>|<unk>|[\s\S]")
    core.pre_tokenizer = pre_tokenizers.Split(one_token, behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


@dataclass
class BuiltModels:
    name: str
    policy: Path  # HF folder: random LlamaForCausalLM + tokenizer
    reward_model: Path  # HF folder: random LlamaForSequenceClassification + tokenizer
    config: LlamaConfig
    n_params: int


def llama_config(size: str, vocab_size: int, **overrides) -> LlamaConfig:
    shape = {**SIZES[size], "vocab_size": vocab_size}
    return LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, **overrides)


def build_models(size: str, folder: Path, device: torch.device, seed: int = 0) -> BuiltModels:
    """Save a random policy and reward model of `size` (with the tokenizer) under `folder`.

    Initialised on `device` (seconds on a GPU instead of minutes on a CPU), saved in bf16.
    """
    tokenizer = build_tokenizer(SIZES[size]["vocab_size"])
    config = llama_config(size, len(tokenizer))
    n_params = 0
    for sub, cls, overrides, offset in (("policy", LlamaForCausalLM, {}, 0),
                                        ("reward", LlamaForSequenceClassification,
                                         {"num_labels": 1}, 1)):
        torch.manual_seed(seed + offset)
        with torch.device(device):
            model = cls(llama_config(size, len(tokenizer), **overrides))
        n_params = n_params or sum(p.numel() for p in model.parameters())
        model.to(torch.bfloat16).save_pretrained(folder / sub)
        tokenizer.save_pretrained(folder / sub)
        del model
    return BuiltModels(size, folder / "policy", folder / "reward", config, n_params)


REWARD_SOURCE = '''
def fraction_of_a(completions, **kwargs):
    """Share of the letter a in the response: a synthetic reward with a gradient to climb."""
    return [c.count("a") / max(len(c), 1) for c in completions]
'''


def write_task(folder: Path, n_train: int = 64, n_eval: int = 8) -> dict[str, str]:
    """Synthetic prompt files and a reward-function file; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train_file": folder / "train.jsonl", "eval_file": folder / "eval.jsonl",
             "reward": folder / "reward.py"}
    for key, count, offset in (("train_file", n_train, 0), ("eval_file", n_eval, 10_000)):
        rows = [{"prompt": f"Say something about the number {offset + i}."} for i in range(count)]
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["reward"].write_text(REWARD_SOURCE)
    return {key: str(path) for key, path in paths.items()}


def chat_prompts(tokenizer, n: int, length: int = 0) -> list[list[int]]:
    """`n` tokenized ChatML prompts, each padded with filler text to about `length` tokens."""
    prompts = []
    for i in range(n):
        text = f"Question {i}: what is {i % 97} + {i % 89}?"
        text += " " + "lorem ipsum " * -(-max(0, length - 20 - len(text)) // 12)  # ChatML: ~20
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(chat, add_special_tokens=False).input_ids)
    return prompts


# --- results, workload settings, memory readings ------------------------------------------

@dataclass
class Row:
    section: int
    check: str
    value: str
    status: str = "info"  # ok | FAIL | info | below goal


@dataclass
class Settings:
    """Workload sizes: real ones for a GPU, small ones for `--tiny` (CPU test)."""

    correct_prompts: int = 8
    correct_tokens: int = 64
    batches: tuple[int, ...] = (64, 256)
    samples_per_prompt: int = 8
    throughput_tokens: int = 256
    prompt_tokens: int = 64
    raft_prompts: int = 16
    raft_tokens: int = 64
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    train_response_tokens: int = 256


TINY = Settings(correct_prompts=4, correct_tokens=16, batches=(4, 8), samples_per_prompt=2,
                throughput_tokens=16, prompt_tokens=24, raft_prompts=4, raft_tokens=12,
                micro_batches=(1, 4), train_response_tokens=24)


@dataclass
class Context:
    settings: Settings
    device: torch.device
    workdir: Path
    sizes: list[str]
    bandwidth_gbs: float | None
    built: dict[str, BuiltModels] = field(default_factory=dict)

    def models(self, size: str) -> BuiltModels:
        if size not in self.built:
            self.built[size] = build_models(size, self.workdir / size, self.device)
        return self.built[size]


# --- memory -----------------------------------------------------------------------------

def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the process's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next(int(ln.split()[1]) / 1024 for ln in status.splitlines() if ln.startswith("VmHWM"))


def memory_label(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "peak RSS (CPU: one memory)"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MB"


def attempt(rows: list[Row], section: int, check: str, fn, *args: Any) -> None:
    """Run one check; an exception becomes a FAIL row instead of ending the script."""
    try:
        fn(*args)
    except Exception as err:  # report and go on: one broken path must not hide the others
        traceback.print_exc()
        rows.append(Row(section, check, f"{type(err).__name__}: {err}"[:300], "FAIL"))
