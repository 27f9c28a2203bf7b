"""`raftlm init DIR`: a new task's folder that trains as written and that you edit into yours.

Writes ``config.yaml`` (commented), ``prompts.jsonl`` / ``heldout.jsonl`` (two-digit additions
with the ``answer`` column the reward reads), ``reward.py`` (a reward function in TRL's
signature) and ``README.md`` (the next commands: a pip install has no ``docs/`` to point to).
``raftlm train --config DIR/config.yaml`` then runs RAFT on the embedded model and lifts
held-out accuracy within a few minutes on a CPU; replace the prompts and the reward with your
own and train again. Paths in the config are relative to the folder raftlm runs from (the
one ``init`` ran in).
"""

from __future__ import annotations

import json
from pathlib import Path

from raftlm.config import EMBEDDED_MODEL, RaftConfig, TrainingConfig, field_choices
from raftlm.data.tasks import arithmetic_rows
from raftlm.errors import InvalidInput
from raftlm.models.names import check_model_path

REWARD_KINDS = ("numeric", "file", "model", "url")
TRAIN_PROMPTS = 200
HELDOUT_PROMPTS = 40
SERVE_PORT = 8000

_HEADER = """\
# A RAFT run written by `raftlm init {dir}`. As written it teaches the model two-digit addition;
# make it your task by editing {dir}/prompts.jsonl, {dir}/heldout.jsonl and the reward below.
#
#   raftlm train --config {dir}/config.yaml     # then: raftlm eval / export / sample / chat
#
# run.output_dir is relative to the folder you run raftlm from, the files below to this file's
# folder. Every field, its default and meaning:
# `raftlm train --help`; change one for a single run with --set, e.g. --set raft.stages=4.
"""

_BODY = """\
run:
  output_dir: {dir}/run           # relative to where you run raftlm (files below: to this file)
  seed: 0
model:
  path: {model}  # an HF model folder, a .gguf file or the embedded model
  dtype: fp32                     # bf16: faster on recent CPUs and GPUs
  lora: {{enabled: true, r: 16, alpha: 32}}   # train a small adapter, not every weight
data:
  train_file: prompts.jsonl       # a JSON object a line: prompt + what the reward reads
  eval_file: heldout.jsonl        # never trained on: the before/after numbers of the run
  prompt_field: prompt            # the column with the user message (text, or chat messages)
  # system_prompt: "Answer with the number only."
raft:                             # each stage: b prompts x K responses, keep the best, fine-tune
  stages: 2
  prompts_per_stage: 32           # b
  samples_per_prompt: 8           # K
generation:
  max_new_tokens: 64
  temperature: 0.7
reward:                           # the sum of its terms' weight x score, for every response
  terms:
{reward}
selection:
  strategy: best_per_prompt       # RAFT's default: the best of the K responses to each prompt
{min_reward}
training:
  objective: {objective}{objective_note}
  learning_rate: 2.0e-4
  epochs: 2                       # passes over each stage's kept responses
evaluation:
  samples_per_prompt: 1           # sampled (besides greedy) answers per held-out prompt
  kl_responses: 16                # responses the KL-to-the-start-model estimate uses
"""

_REWARDS = {
    "numeric": """\
    - name: numeric_answer        # built-in: 1 when the reply's last number equals `answer`
    # - name: reward.py:reward    # your own function instead (reward.py)""",
    "file": """\
    - name: reward.py:reward      # your function: reward.py, TRL's signature""",
    "model": """\
    - model: reward-model         # an HF sequence-classification model folder (yours to put there)
      batch_size: 16""",
    "url": """\
    # Start the server first, in another terminal (it can run on another machine):
    #   raftlm serve-reward --reward {dir}/reward.py:reward --port {port}
    - url: http://127.0.0.1:{port}/score""",
}

_MIN_REWARD = """\
  min_reward: 1.0                 # never imitate a wrong answer (this reward is 0 or 1);
                                  # remove it, or set your reward's bar, for a graded reward"""
_MIN_REWARD_GRADED = """\
  # min_reward: 0.5               # keep only responses at least this good (your model's scale)"""

REWARD_PY = '''\
"""The reward of this task. raftlm calls `reward` with TRL's reward-function signature:

    reward(prompts=[...], completions=[...], **columns) -> list[float]

`prompts[i]` is the prompt column of the row that `completions[i]` answers (text, or a list of
chat messages); every other column of prompts.jsonl arrives as a keyword argument, one value per
completion (here `answer`). Return one float per completion, higher is better. RAFT keeps the
best of the K responses to each prompt, so only their order matters for that choice;
`selection.min_reward` in config.yaml is on this function's scale.
"""

import re

_NUMBER = re.compile(r"-?\\d+(?:\\.\\d+)?")


def reward(prompts: list, completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 where the last number in the completion equals the row's `answer`, else 0.0."""
    scores = []
    for completion, expected in zip(completions, answer):
        numbers = _NUMBER.findall(completion.replace(",", ""))
        scores.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return scores
'''


_README = """\
# {dir}: a RAFT task written by `raftlm init`

As written it teaches the model two-digit addition; make it yours by editing the prompts and
the reward, then train again.

- `config.yaml`: the run (model, data, RAFT, sampling, reward, training). Every field with its
  default and meaning: `raftlm train --help`. `run.output_dir` is relative to the folder you
  run raftlm from; the files the config names, to the config's folder.
- `prompts.jsonl` (training) and `heldout.jsonl` (never trained on): a JSON object a line, the
  `prompt` plus the columns the reward reads (`answer`).
- `reward.py`: a reward function in TRL's signature, `reward(prompts, completions, answer,
  **columns) -> list[float]`.

## Next

    raftlm train --config {dir}/config.yaml          # a few minutes on a CPU
    raftlm report {dir}/run                          # plots + {dir}/run/report.html
    raftlm eval {dir}/run                            # the newest checkpoint, held-out set
    raftlm sample {dir}/run --prompt "What is 12 + 30?" --column answer=42
    raftlm chat {dir}/run                            # /help inside lists its commands
    raftlm export {dir}/run --format hf --out {dir}/export   # or --format gguf --out x.gguf
    raftlm train --resume {dir}/run                  # continue a run that was stopped

`raftlm COMMAND --help` describes each command. On a busy machine, `--threads N` (tools) or
`--set run.threads=N` (train) chooses the CPU threads.
"""


def init_task(folder: Path, model: str = EMBEDDED_MODEL, reward: str = "numeric",
              objective: str = "sft") -> list[Path]:
    """Write a new task's files into ``folder`` (new or empty); returns the files written.

    The config is loaded back before returning, so what ``init`` writes always validates.
    """
    if reward not in REWARD_KINDS:
        raise InvalidInput(f"--reward: expected one of {', '.join(REWARD_KINDS)}, got {reward!r}")
    objectives = field_choices(TrainingConfig, "objective")
    if objective not in objectives:
        raise InvalidInput(f"--objective: expected one of {', '.join(objectives)}, "
                           f"got {objective!r}")
    check_model_path(model, field="--model")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InvalidInput(f"{folder}: exists and is not an empty folder; `raftlm init` writes "
                           "into a new one (choose another name)")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": config_text(folder, model, reward, objective),
        "prompts.jsonl": _jsonl(arithmetic_rows("train", TRAIN_PROMPTS)),
        "heldout.jsonl": _jsonl(arithmetic_rows("eval", HELDOUT_PROMPTS)),
        "reward.py": REWARD_PY,
        "README.md": _README.format(dir=folder.as_posix()),
    }
    written = []
    for name, text in files.items():
        (folder / name).write_text(text)
        written.append(folder / name)
    RaftConfig.from_yaml(folder / "config.yaml")
    return written


def config_text(folder: Path, model: str, reward: str, objective: str) -> str:
    """The commented config.yaml of a task in ``folder`` (as the user wrote it)."""
    where = folder.as_posix()
    note = ("RAFT as in the paper; the others: docs/objectives.md" if objective == "sft" else
            "docs/objectives.md; sft is RAFT as in the paper")
    body = _BODY.format(
        dir=where, model=model, objective=objective, objective_note=f"  # {note}",
        reward=_REWARDS[reward].format(dir=where, port=SERVE_PORT),
        min_reward=_MIN_REWARD_GRADED if reward == "model" else _MIN_REWARD,
    )
    return _HEADER.format(dir=where) + _align_comments(body)


def _align_comments(text: str, column: int = 34) -> str:
    """Start the comments after values, and the comment lines continuing them, in one column
    (paths of any length in the values would leave them ragged)."""
    lines = []
    for line in text.splitlines():
        code, sep, comment = line.partition("  # ")
        if sep and code.strip() and not code.lstrip().startswith("#"):
            line = f"{code.rstrip():<{column - 2}}  # {comment}"
        elif line.startswith(" " * 20) and line.lstrip().startswith("#"):
            line = " " * column + line.lstrip()
        lines.append(line)
    return "\n".join(lines) + "\n"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def next_steps(folder: Path, reward: str) -> str:
    """What `raftlm init` prints after writing the files: the command to run, what to edit."""
    where = folder.as_posix()
    lines = [f"wrote {where}/: config.yaml, prompts.jsonl, heldout.jsonl, reward.py, README.md"]
    if reward == "model":
        lines.append(f"put a reward model (an HF sequence-classification folder) at "
                     f"{where}/reward-model, or point reward.terms[0].model at yours")
    if reward == "url":
        lines.append(f"start the reward server first: raftlm serve-reward --reward "
                     f"{where}/reward.py:reward --port {SERVE_PORT}")
    lines.append(f"train:  raftlm train --config {where}/config.yaml")
    lines.append(f"then:   {where}/README.md (report, eval, sample, chat, export; each "
                 "command's --help)")
    return "\n".join(lines)
