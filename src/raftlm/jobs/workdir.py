"""The work folder of `raftlm generate | score | select | finetune`: one RAFT stage as files.

It is shaped like a run directory, so `raftlm report WORK` reads it::

    WORK/config.yaml                          the resolved config (written by generate)
    WORK/metrics.jsonl                        the stage's numbers once selected (`raftlm train`'s)
    WORK/stages/NNN/job.json                  what the stage is: its prompts (in draw order), the
                                              shard count, the prompt order after the draw, the
                                              policy that samples it, the config's fingerprints
    WORK/stages/NNN/shards/III-of-NNN/        while shard III samples: its journal (resume)
    WORK/stages/NNN/shards/III-of-NNN.jsonl   a finished shard: a header line, then its samples
    WORK/stages/NNN/score/                    while scoring: the scores' journal (resume)
    WORK/stages/NNN/candidates.jsonl          every sample with its rewards (score), selected flag
                                              and training weight (select)

Rows are `raftlm train`'s `candidates.jsonl` rows (`stage.record.candidate_rows`) plus what
the later steps need and a row of that file lacks: the prompt's token ids and columns (the
reward reads them), the response's token ids and the log-probs the sampler recorded (pi_old),
and `weight`.
Floats go through JSON's shortest round-trip form, so every number comes back bit for bit.

A fingerprint is a short hash per config section that decides a step's output; a later step
recomputes it from its own `--config` and refuses a folder made under another one, naming the
sections that differ. Knobs that only change speed (batch size, threads, cache folder) are not
part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from raftlm.config import RaftConfig
from raftlm.data.prompts import PromptRecord
from raftlm.errors import InvalidInput
from raftlm.rewards.kinds import reward_fingerprint
from raftlm.run.rundir import atomic_write_text, read_jsonl
from raftlm.stage.rank import Ranked
from raftlm.stage.record import candidate_rows, example_positions
from raftlm.stage.rollouts import Rollout, Rollouts
from raftlm.training.objectives import objective_of

JOB_FILE = "job.json"
CANDIDATES_FILE = "candidates.jsonl"
SPEED_ONLY = {"model": ("cache_dir", "gradient_checkpointing"),
              "generation": ("batch_size", "vllm.gpu_memory_utilization")}


class WorkMismatch(InvalidInput):
    """A work folder made under another config, policy or shard count, or missing a part."""


# --------------------------------------------------------------------------- fingerprints


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _section(config: RaftConfig, name: str) -> dict[str, Any]:
    values = dataclasses.asdict(getattr(config, name))
    for dotted in SPEED_ONLY.get(name, ()):
        *path, key = dotted.split(".")
        node = values
        for part in path:
            node = node[part]
        node.pop(key)
    return values


def sampling_fingerprint(config: RaftConfig, policy: dict[str, Any] | None) -> dict[str, str]:
    """What decides a stage's samples, per section: model, prompts, seed, b and K, sampling
    settings, and the checkpoint that samples (None: the configured base model)."""
    return {
        "model": _digest(_section(config, "model")),
        "data": _digest(_section(config, "data")),
        "run.seed": _digest(config.run.seed),
        "raft.prompts_per_stage": _digest(config.raft.prompts_per_stage),
        "raft.samples_per_prompt": _digest(config.raft.samples_per_prompt),
        "generation": _digest(_section(config, "generation")),
        "policy (--from)": _digest(policy),
    }


def check_same(where: Path, what: str, recorded: dict[str, str] | str | None,
               expected: dict[str, str] | str, fix: str) -> None:
    """Refuse (one line) when `recorded` differs from `expected`, naming what differs."""
    if recorded == expected:
        return
    if isinstance(recorded, dict) and isinstance(expected, dict):
        differ = [k for k in expected if recorded.get(k) != expected[k]]
        what = f"{what} ({', '.join(differ)} differ from this config's)"
    raise WorkMismatch(f"{where}: {what}; {fix}")


def check_sampled_with(folder: Path, job: dict[str, Any], config: RaftConfig,
                       policy: dict[str, Any] | None) -> None:
    """Refuse a stage folder whose samples another config (or another policy) made."""
    check_same(folder, "sampled under another config", job["fingerprint"],
               sampling_fingerprint(config, policy),
               "give the --config (and --set, --from) it was generated with, or another folder")


def check_scored_with(folder: Path, job: dict[str, Any], config: RaftConfig) -> None:
    if job.get("scoring") is None:
        raise WorkMismatch(f"{folder}: not scored yet; run raftlm score on it first")
    check_same(folder, "scored under another reward config (reward.* differs)",
               job["scoring"], reward_fingerprint(config.reward), "run raftlm score on it again")


# --------------------------------------------------------------------------- folders


def stage_folder(work: Path, stage: int) -> Path:
    return Path(work) / "stages" / f"{stage:03d}"


def find_stage(work: Path, stage: int | None) -> int:
    """`stage` if given, else the only stage in `work`; refuses an empty or ambiguous folder."""
    found = sorted(int(p.parent.name) for p in (Path(work) / "stages").glob(f"*/{JOB_FILE}"))
    if stage is not None:
        if stage not in found:
            raise WorkMismatch(f"{work}: no stage {stage} (raftlm generate writes stages; "
                               f"found: {found or 'none'})")
        return stage
    if not found:
        raise WorkMismatch(f"{work}: no generated stage in it (run raftlm generate --out {work})")
    if len(found) > 1:
        raise WorkMismatch(f"{work}: holds stages {found}; say which with --stage N")
    return found[0]


def read_job(folder: Path) -> dict[str, Any]:
    path = folder / JOB_FILE
    if not path.is_file():
        raise WorkMismatch(f"{folder}: no {JOB_FILE} (not made by raftlm generate)")
    return json.loads(path.read_text())


def write_job(folder: Path, job: dict[str, Any]) -> None:
    atomic_write_text(folder / JOB_FILE, json.dumps(job, indent=1) + "\n")


def shard_name(index: int, count: int) -> str:
    return f"{index:03d}-of-{count:03d}"


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard I/N` (1-based: a SLURM array's task ids 1..N) as (I, N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InvalidInput(f"--shard: expected I/N, e.g. 2/8, got {text!r}") from None
    if not 1 <= index <= count:
        raise InvalidInput(f"--shard {text}: expected 1 <= I <= N")
    return index, count


def shard_bounds(n_items: int, index: int, count: int) -> tuple[int, int]:
    """Shard `index` (1-based) of `count`: a contiguous slice, sizes differing by at most one."""
    return (index - 1) * n_items // count, index * n_items // count


def write_shard(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    lines = [json.dumps({"shard": header}, ensure_ascii=False)]
    lines += [json.dumps(row, ensure_ascii=False) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_shard_header(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        return json.loads(handle.readline())["shard"]


def read_shards(folder: Path, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shard's samples, merged in the stage's prompt order. Refuses a missing, unfinished
    or foreign shard (another shard count, another config)."""
    count, shards = job["shards"], folder / "shards"
    missing = [f"{i}/{count}" for i in range(1, count + 1)
               if not (shards / f"{shard_name(i, count)}.jsonl").is_file()]
    if missing:
        running = [m for m in missing if (shards / shard_name(*map(int, m.split("/")))).is_dir()]
        note = f" ({', '.join(running)} started, not finished)" if running else ""
        raise WorkMismatch(f"{folder}: shard {', '.join(missing)} not generated{note}; run "
                           f"raftlm generate --shard I/{count} for each")
    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for i in range(1, count + 1):
        path = shards / f"{shard_name(i, count)}.jsonl"
        lines = read_jsonl(path)
        check_same(path, "sampled under another config", lines[0]["shard"]["fingerprint"],
                   job["fingerprint"], "generate this shard again with the stage's config")
        for row in lines[1:]:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
    absent = [pid for pid in job["prompt_ids"] if pid not in by_prompt]
    if absent:
        raise WorkMismatch(f"{folder}: the shards hold no samples of prompt(s) {absent[:5]}")
    return [row for pid in job["prompt_ids"] for row in by_prompt[pid]]


# --------------------------------------------------------------------------- rows


def candidate_table(candidates: Rollouts, ranked: Ranked | None = None
                    ) -> list[dict[str, Any]]:
    """`candidates.jsonl` rows (those of `raftlm train`) plus prompt and response token ids,
    prompt columns, recorded log-probs and, once ranked, each response's training weight."""
    mask = None if ranked is None else ranked.selection.mask
    weights = None if ranked is None else example_weights(candidates, ranked)
    rows = candidate_rows(candidates, mask)
    pairs = [(p, j) for p, row in enumerate(candidates.responses) for j in range(len(row))]
    for row, (p, j) in zip(rows, pairs, strict=True):
        prompt, response = candidates.prompts[p], candidates.responses[p][j]
        row.update(prompt_token_ids=prompt.token_ids, columns=prompt.columns,
                   token_ids=response.token_ids, token_log_probs=response.token_log_probs,
                   loss_mask=response.loss_mask,
                   weight=None if weights is None else weights.get((p, j)))
    return rows


def example_weights(candidates: Rollouts, ranked: Ranked) -> dict[tuple[int, int], float]:
    """(prompt, sample) -> weight (or advantage) of each response the objective trains on."""
    return {position: float(e.weight) for e, position in
            zip(ranked.examples, example_positions(candidates, ranked.examples))}


def candidates_from_rows(rows: list[dict[str, Any]]) -> Rollouts:
    """The stage's `Rollouts` from rows of `candidate_table`, prompts in row order; rewards
    NaN where a row has none (not scored yet)."""
    prompts: list[PromptRecord] = []
    responses: list[list[Rollout]] = []
    groups: list[list[dict[str, Any]]] = []
    for row in rows:
        if not prompts or prompts[-1].id != row["prompt_id"]:
            prompts.append(PromptRecord(row["prompt_id"], row["original_prompt"], row["prompt"],
                                        row["prompt_token_ids"], row["columns"]))
            responses.append([])
            groups.append([])
        if row["sample"] != len(responses[-1]):
            raise WorkMismatch(f"prompt {row['prompt_id']}: sample {row['sample']} out of order")
        responses[-1].append(Rollout(row["response"], row["token_ids"], row["finish_reason"],
                                     row["token_log_probs"], row.get("loss_mask"),
                                     turns=row.get("turns")))
        groups[-1].append(row)
    width = max((len(g) for g in groups), default=0)
    rewards = np.full((len(groups), width), np.nan)
    terms = sorted({name for row in rows for name in row.get("rewards") or {}})
    per_term = {name: np.full((len(groups), width), np.nan) for name in terms}
    for p, group in enumerate(groups):
        for j, row in enumerate(group):
            rewards[p, j] = np.nan if row["reward"] is None else row["reward"]
            for name, value in (row.get("rewards") or {}).items():
                per_term[name][p, j] = np.nan if value is None else value
    return Rollouts(prompts, responses, rewards, per_term)


def sft_rows(rows: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The responses training uses, in the conversational prompt-completion format SFT trainers
    read (TRL's SFTTrainer then trains on the completion only, as raftlm does): the prompt's
    messages (with the run's system prompt, as raftlm renders it), the response as the
    assistant's completion, its reward and weight."""
    out = []
    for row in rows:
        if row.get("weight") is None:
            continue
        prompt = row["original_prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        out.append({"prompt": messages,
                    "completion": [{"role": "assistant", "content": row["response"]}],
                    "reward": row["reward"], "weight": row["weight"],
                    "prompt_id": row["prompt_id"], "sample": row["sample"]})
    return out


def refuse_what_only_train_does(config: RaftConfig, command: str) -> None:
    """A work folder holds one stage and one weight per response: a paired objective (dpo,
    rpo) trains on (chosen, rejected) pairs, and replay and anchor rows mix in other stages'
    and a dataset's rows; only `raftlm train` builds those."""
    if objective_of(config.training).weighting.pairs is not None:
        raise WorkMismatch(
            f"training.objective: {config.training.objective}: raftlm {command} records one "
            "weight per response, not the (chosen, rejected) pairs a paired objective trains "
            "on; use raftlm train for it")
    if command == "finetune" and (config.raft.replay is not None
                                  or config.data.anchor is not None):
        raise WorkMismatch(
            "raft.replay and data.anchor: raftlm finetune trains on one work folder's stage; "
            "earlier stages' kept responses and anchor rows are mixed in by raftlm train, use "
            "it for them")
