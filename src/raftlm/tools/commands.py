"""`raftlm export | sample | chat | serve | serve-reward`: their command-line arguments and
handlers."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from raftlm.errors import InvalidInput
from raftlm.tools.args import add_quiet_arg, add_threads_arg, add_tool_args, with_tools

# A chat reply's default length: a conversation's, not the run's `generation.max_new_tokens`
# (sized for the task's answers, often a few dozen tokens).
CHAT_MAX_NEW_TOKENS = 256


def cmd_export(args: argparse.Namespace) -> int:
    from raftlm.run.threads import configure_threads
    from raftlm.tools.export import export

    configure_threads(args.threads)
    out = export(args.target, args.out, args.format, args.stage, args.dtype)
    print(f"exported ({args.format}): {out}")
    return 0


def generation_settings(args: argparse.Namespace, target: Any) -> Any:
    """The run's (or the defaults') sampling settings with the command line's overrides."""
    changes = {k: v for k, v in [("max_new_tokens", args.max_new_tokens),
                                 ("temperature", args.temperature)] if v is not None}
    return dataclasses.replace(target.config.generation, **changes)


def cmd_sample(args: argparse.Namespace) -> int:
    from raftlm.run.threads import configure_threads
    from raftlm.tools.chat import format_turn, sample_responses
    from raftlm.tools.target import load_target

    columns = dict(parse_column(c) for c in args.column)
    configure_threads(args.threads)
    target = load_target(args.target, args.stage)
    target = dataclasses.replace(target, config=with_tools(target.config, args))
    results, problem = sample_responses(target, args.prompt, args.n,
                                        generation_settings(args, target), columns, args.seed)
    for i, result in enumerate(results, start=1):
        reward = "" if result.reward is None else f" reward {result.reward:.3f}"
        print(f"--- sample {i}/{len(results)}{reward} ({result.finish_reason})")
        print("".join(map(format_turn, result.turns)).rstrip("\n") if result.turns
              else result.text)
    if problem:
        print(f"reward: not computed: {problem}")
    return 0


def parse_column(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidInput(f"--column: expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_chat(args: argparse.Namespace) -> int:
    from raftlm.run.progress import set_quiet
    from raftlm.run.threads import configure_threads
    from raftlm.tools.chat import chat
    from raftlm.tools.target import load_target

    set_quiet(True)  # progress bars would interleave with the streamed reply
    configure_threads(args.threads)
    target = load_target(args.target, args.stage)
    target = dataclasses.replace(target, config=with_tools(target.config, args))
    chat(target, generation_settings(args, target))
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from raftlm.config import ConfigError
    from raftlm.tools.serve_reward import bind, load_reward_spec, reward_app, serve_forever

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency: expected >= 1, got {args.concurrency}")
    app = reward_app(load_reward_spec(args.reward, args.batch_size, args.device), args.reward,
                     args.concurrency)
    sock = bind(args.host, args.port)
    print(f"serving reward {args.reward!r} on http://{args.host}:{sock.getsockname()[1]}/score "
          "(Ctrl-C stops)", flush=True)
    serve_forever(app, sock)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from raftlm.run.progress import set_quiet
    from raftlm.run.threads import configure_threads
    from raftlm.tools.serve import openai_app, served_name
    from raftlm.tools.serve_reward import bind, serve_forever
    from raftlm.tools.target import load_target

    set_quiet(True)  # a progress bar per request would flood the log
    configure_threads(args.threads)
    target = load_target(args.target, args.stage)
    name = args.name or served_name(target, args.target)
    sock = bind(args.host, args.port)
    print(f"serving model {name!r} on http://{args.host}:{sock.getsockname()[1]}/v1 "
          "(OpenAI-compatible chat completions; Ctrl-C stops)", flush=True)
    serve_forever(openai_app(target, name), sock)
    return 0


def add_server_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on [default: 127.0.0.1, this machine only].")
    parser.add_argument("--port", type=int, default=port,
                        help=f"Port [default: {port}; 0 = a free one, printed at start].")


def cmd_init(args: argparse.Namespace) -> int:
    from raftlm.tools.init import init_task, next_steps

    init_task(args.dir, args.model, args.reward, args.objective)
    print(next_steps(args.dir, args.reward))
    return 0


def add_init_command(commands: Any) -> None:
    """`raftlm init DIR`: a new task's folder (config, prompts, reward) that trains as written."""
    from raftlm.config import EMBEDDED_MODEL, TrainingConfig, field_choices
    from raftlm.tools.init import REWARD_KINDS

    init = commands.add_parser(
        "init", help="Write a new task's folder: config, prompts, reward; trains as written.",
        description="Writes DIR/config.yaml (commented), DIR/prompts.jsonl and "
                    "DIR/heldout.jsonl (rows with the `answer` column the reward reads) and "
                    "DIR/reward.py (a reward function in TRL's signature). `raftlm train "
                    "--config DIR/config.yaml` then trains the model on them as written; edit "
                    "the prompts and the reward into your task. DIR/README.md lists the next "
                    "commands (report, eval, sample, chat, export).",
    )
    init.add_argument("dir", type=Path, metavar="DIR", help="A new (or empty) folder.")
    init.add_argument("--model", default=EMBEDDED_MODEL,
                      help=f"HF model folder, .gguf file or {EMBEDDED_MODEL} [default].")
    init.add_argument("--reward", choices=REWARD_KINDS, default="numeric",
                      help="numeric: the built-in numeric_answer [default]; file: reward.py; "
                           "model: a reward-model folder; url: reward.py behind `raftlm "
                           "serve-reward`.")
    init.add_argument("--objective", choices=field_choices(TrainingConfig, "objective"),
                      default="sft", help="training.objective [default: sft, i.e. RAFT].")
    init.set_defaults(handler=cmd_init)


def cmd_cache(args: argparse.Namespace) -> int:
    from raftlm.models.cache import cache_entries, clean_cache, human_size

    if args.action == "clean":
        deleted, busy = clean_cache(args.dir)
        for entry in busy:
            print(f"kept {entry.path} (a raftlm is converting it now)")
        freed = human_size(sum(e.size for e in deleted))
        print(f"deleted {len(deleted)} converted model(s) from {args.dir}, {freed} freed")
        return 0
    entries = cache_entries(args.dir)
    for entry in entries:
        note = "" if entry.complete else "  (left by a stopped conversion; clean deletes it)"
        print(f"{human_size(entry.size):>10}  {entry.path}{note}")
    total = human_size(sum(e.size for e in entries))
    print(f"{len(entries)} converted model(s) in {args.dir}, {total}"
          + ("; `raftlm cache clean` deletes them" if entries else ""))
    return 0


def add_cache_command(commands: Any) -> None:
    """`raftlm cache [list|clean]`: the GGUF models raftlm converted to safetensors."""
    from raftlm.config import ModelConfig

    cache = commands.add_parser(
        "cache", help="List or delete the converted GGUF models in raftlm's cache.",
        description="A .gguf model (the embedded one included) is dequantized to safetensors "
                    "once, on first use, into model.cache_dir (hundreds of MB each). `list` "
                    "shows them with their sizes; `clean` deletes them (a later use converts "
                    "again). Nothing else is stored there.",
    )
    cache.add_argument("action", nargs="?", choices=["list", "clean"], default="list",
                       help="list [default] or clean.")
    default = ModelConfig().cache_dir
    cache.add_argument("--dir", default=default,
                       help=f"The cache folder (a run's model.cache_dir) [default: {default}].")
    cache.set_defaults(handler=cmd_cache)


def add_verbose_flags(commands: Any) -> None:
    """Give every `raftlm` sub-command registered so far `--verbose`: libraries' warnings and
    progress bars, hidden by default (`raftlm.run.progress.configure_output`), shown."""
    for parser in commands.choices.values():
        if not any("--verbose" in action.option_strings for action in parser._actions):
            parser.add_argument("--verbose", action="store_true",
                                help="Also show libraries' warnings and progress bars.")


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """The model a tool acts on (a run's stage or a model path) and the threads it runs on."""
    add_threads_arg(parser)
    parser.add_argument("target", metavar="RUN_DIR|MODEL",
                        help="A run directory, an HF model folder, a .gguf file or "
                             "embedded:smollm2-135m-instruct.")
    parser.add_argument("--stage", type=int, metavar="N",
                        help="The run's stage to use (default: the latest checkpoint; 0 = the "
                             "base model).")


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="Longest response [default: the run's generation.max_new_tokens]"
                        if max_new_tokens is None else
                        f"Longest reply [default: {max_new_tokens}, not the run's "
                        "generation.max_new_tokens].")
    parser.add_argument("--temperature", type=float,
                        help="Sampling temperature [default: the run's].")


def register(commands: Any) -> None:
    """Add `init`, `cache`, `export`, `sample`, `chat`, `serve-reward` and `serve` to the
    `raftlm` sub-commands."""
    add_init_command(commands)
    add_cache_command(commands)
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
    add_tool_args(sample)
    add_quiet_arg(sample)
    sample.set_defaults(handler=cmd_sample)

    chat = commands.add_parser(
        "chat", help="Chat with a run's policy or a model in the terminal.",
        description="Multi-turn chat with the training chat template; replies stream as they "
                    "are sampled. /help lists the commands, /reset starts a new conversation, "
                    "/exit or Ctrl-D quits.",
    )
    add_target_args(chat)
    add_sampling_args(chat, CHAT_MAX_NEW_TOKENS)
    add_tool_args(chat)
    chat.set_defaults(handler=cmd_chat)

    serve_reward = commands.add_parser(
        "serve-reward", help="Serve a reward over HTTP (for reward.terms[].url).",
        description="Serves a reward term (a built-in, file.py:fn, pkg.mod:fn or a reward-model "
                    "folder) on POST /score with the JSON protocol of docs/rewards.md, so that "
                    "it can run on another GPU or machine.",
    )
    serve_reward.add_argument("--reward", required=True, metavar="SPEC",
                              help="numeric_answer, file.py:fn, pkg.mod:fn or a model folder.")
    add_server_args(serve_reward, 8000)
    serve_reward.add_argument("--concurrency", type=int, default=1,
                              help="Calls of a plain (not async) function or model at once, each "
                                   "in a worker thread [default: 1].")
    serve_reward.add_argument("--batch-size", type=int, default=16,
                              help="Reward model: sequences per forward pass [default: 16].")
    serve_reward.add_argument("--device", default="auto",
                              help="Reward model: torch device [default: auto, the GPU when "
                                   "there is one].")
    serve_reward.set_defaults(handler=cmd_serve_reward)

    serve = commands.add_parser(
        "serve", help="Serve a run's policy or a model as an OpenAI-compatible API.",
        description="POST /v1/chat/completions answered by raftlm's sampler with the run's chat "
                    "template and system prompt (temperature 0 = greedy; no streaming).",
    )
    add_target_args(serve)
    add_server_args(serve, 8001)
    serve.add_argument("--name", help="The model's name in the API [default: RUN@stageN or the "
                                      "model path].")
    serve.set_defaults(handler=cmd_serve)
