"""`raftlm export | sample | chat`: their command-line arguments and handlers."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    from raftlm.tools.export import export

    out = export(args.target, args.out, args.format, args.stage, args.dtype)
    print(f"exported ({args.format}): {out}")
    return 0


def generation_settings(args: argparse.Namespace, target: Any) -> Any:
    """The run's (or the defaults') sampling settings with the command line's overrides."""
    changes = {k: v for k, v in [("max_new_tokens", args.max_new_tokens),
                                 ("temperature", args.temperature)] if v is not None}
    return dataclasses.replace(target.config.generation, **changes)


def cmd_sample(args: argparse.Namespace) -> int:
    from raftlm.tools.chat import sample_responses
    from raftlm.tools.target import load_target

    columns = dict(parse_column(c) for c in args.column)
    target = load_target(args.target, args.stage)
    results, problem = sample_responses(target, args.prompt, args.n,
                                        generation_settings(args, target), columns, args.seed)
    for i, result in enumerate(results, start=1):
        reward = "" if result.reward is None else f" reward {result.reward:.3f}"
        print(f"--- sample {i}/{len(results)}{reward} ({result.finish_reason})")
        print(result.text)
    if problem:
        print(f"reward: not computed: {problem}")
    return 0


def parse_column(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--column: expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_chat(args: argparse.Namespace) -> int:
    from raftlm.run.progress import set_quiet
    from raftlm.tools.chat import chat
    from raftlm.tools.target import load_target

    set_quiet(True)  # progress bars would interleave with the streamed reply
    target = load_target(args.target, args.stage)
    chat(target, generation_settings(args, target))
    return 0


def add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR|MODEL",
                        help="A run directory, an HF model folder, a .gguf file or "
                             "embedded:smollm2-135m-instruct.")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="The run's stage to use (default: the latest checkpoint; 0 = the "
                             "base model).")


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="Longest response [default: the run's generation.max_new_tokens]"
                        if max_new_tokens is None else "Longest reply.")
    parser.add_argument("--temperature", type=float,
                        help="Sampling temperature [default: the run's].")


def add_tool_commands(commands: Any) -> None:
    """Add `export`, `sample` and `chat` to the `raftlm` sub-command parsers."""
    export = commands.add_parser(
        "export", help="Export a run's policy as an HF folder or a GGUF file.",
        description="hf: a standalone HF folder (LoRA merged, tokenizer, generation config, "
                    "model card with the run's held-out results). gguf: one GGUF file for "
                    "llama.cpp/ollama (Llama-architecture models).",
    )
    add_target_args(export)
    export.add_argument("--format", choices=["hf", "gguf"], required=True)
    export.add_argument("--out", type=Path, required=True, metavar="PATH",
                        help="New folder (hf) or .gguf file (gguf).")
    export.add_argument("--dtype", choices=["f16", "f32"], default="f16",
                        help="GGUF tensor type [default: f16].")
    export.set_defaults(handler=cmd_export)

    sample = commands.add_parser(
        "sample", help="Sample responses to one prompt (with rewards for a run).",
        description="K responses to --prompt from a run's policy (with the run's reward) or "
                    "from a model, with the run's chat template and sampling settings.",
    )
    add_target_args(sample)
    sample.add_argument("--prompt", required=True, help="The user message.")
    sample.add_argument("--n", type=int, default=4, help="Responses to sample [default: 4].")
    sample.add_argument("--column", action="append", default=[], metavar="KEY=VALUE",
                        help="A column for the reward, e.g. --column answer=42 (repeatable).")
    sample.add_argument("--seed", type=int, default=0, help="Sampling seed [default: 0].")
    add_sampling_args(sample, None)
    sample.add_argument("--quiet", action="store_true", help="No progress bars or lines.")
    sample.set_defaults(handler=cmd_sample)

    chat = commands.add_parser(
        "chat", help="Chat with a run's policy or a model in the terminal.",
        description="Multi-turn chat with the training chat template; replies stream as they "
                    "are sampled. /exit or Ctrl-D quits.",
    )
    add_target_args(chat)
    add_sampling_args(chat, 256)
    chat.set_defaults(handler=cmd_chat)
