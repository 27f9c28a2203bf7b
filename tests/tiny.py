"""Tiny, randomly initialised models and a character-level tokenizer for fast tests.

Nothing here downloads anything: the tokenizer is built in memory and saved like a real one.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from raftlm.sampling.completion import Completion

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = len(SPECIAL) + len(string.printable)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with ChatML specials; eos = pad = <|im_end|> like SmolLM2."""
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_causal_lm(seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size)).eval()


def tiny_reward_model(
    seed: int = 0, vocab_size: int = TINY_VOCAB
) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size, num_labels=1)
    return LlamaForSequenceClassification(config).eval()


def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained in memory on sums:
    GGUF's `gpt2` tokenizer model describes exactly this kind."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [f"What is {a} + {b}? {a} + {b} = {a + b}." for a in range(40) for b in range(40)]
    core.train_from_iterator(texts + ["user assistant system Hello there Say"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_bpe_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the byte-level BPE tokenizer (what `raftlm export --format
    gguf` can write), saved as an HF folder."""
    tokenizer = tiny_bpe_tokenizer()
    tiny_causal_lm(seed, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny causal LM plus tokenizer saved as an ordinary HF folder."""
    tok = tiny_tokenizer()
    tiny_causal_lm(seed, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


DIGITS_REWARD = """
def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
"""


def write_digits_task(folder: Path, reward_file: str = DIGITS_REWARD) -> Path:
    """The loop tests' small task in `folder`: 12 "Say i digits" prompts (train.jsonl), the
    first 3 of them (eval.jsonl) and `reward_file` as rewards.py; returns `folder`."""
    rows = [{"prompt": f"Say {i} digits", "answer": str(i)} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (folder / "rewards.py").write_text(reward_file)
    return folder


def differences(actual: dict, expected: dict) -> list[str]:
    """What differs between two run snapshots ({"metrics": [...], "files": {name: bytes}}), in
    a few short lines: CI shows only the tail of a failure, and a run's bytes would fill it."""
    found = []
    for stage, (ours, theirs) in enumerate(zip(actual["metrics"], expected["metrics"])):
        keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if keys:
            found.append(f"metrics of stage {stage}: " + ", ".join(
                f"{k} {ours.get(k)!r} != {theirs.get(k)!r}" for k in keys[:4]))
    if len(actual["metrics"]) != len(expected["metrics"]):
        found.append(f"{len(actual['metrics'])} metric rows, expected {len(expected['metrics'])}")
    for name in sorted(actual["files"].keys() | expected["files"].keys()):
        ours = actual["files"].get(name, b"<absent>")
        theirs = expected["files"].get(name, b"<absent>")
        if ours == theirs:
            continue
        if isinstance(ours, bytes) and isinstance(theirs, bytes) and name.endswith(".jsonl"):
            lines = list(zip(ours.splitlines(), theirs.splitlines()))
            at = next((i for i, (a, b) in enumerate(lines) if a != b), len(lines))
            pair = lines[at] if at < len(lines) else (b"", b"")
            found.append(f"{name} line {at + 1}: {pair[0][:240]!r} != {pair[1][:240]!r}")
        else:
            found.append(f"{name} differs ({_size(ours)} vs {_size(theirs)} bytes)")
    return found


def assert_same_run(actual: dict, expected: dict, context: str = "") -> None:
    """Fails naming what differs (not through pytest's rewriting, which would print both)."""
    found = differences(actual, expected)
    if found:
        raise AssertionError(f"{context}{': ' if context else ''}" + "; ".join(found[:6]))


def _size(content) -> str:
    return "?" if content is None else str(len(content))


def scripted_turns(tok, tool: str = "calculator"):
    """Odd draws ask `tool` (a calculator) how many digits the prompt wants, then answer with
    that many; even draws answer at once. The sampler's hooks (`on_finish`, `more`) are not
    called: a sampler that reports its samples when it returns, and never lets turns join."""
    def turn(seen, draw):
        n = int(re.findall(r"Say (\d+) digits", seen)[-1])
        if "<|im_start|>tool" in seen:
            text = "9" * n + "<|im_end|>"
        elif draw % 2:
            text = (f'<tool_call>{{"name": "{tool}", "arguments": {{"expression": '
                    f'"{n}+0"}}}}</tool_call>')
        else:
            text = "none<|im_end|>"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return Completion(tok.decode(ids, skip_special_tokens=True), ids,
                          "stop_string" if "tool_call" in text else "eos", [-1.0] * len(ids))

    def generate(policy, tokenizer, contexts, counts, config, *, seeds, desc, max_new_tokens,
                 done=None, greedy=False, keep_kv=None, on_finish=None, more=None,
                 shared_prefix=None):
        counts = [counts] * len(contexts) if isinstance(counts, int) else counts
        return [[turn(tokenizer.decode(context), seed + j) for j in range(n)]
                for context, seed, n in zip(contexts, seeds, counts)]

    return generate
