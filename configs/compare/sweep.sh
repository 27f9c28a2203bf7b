#!/usr/bin/env bash
# The comparison of docs/objectives.md (issue 17, section 3): every objective x 3 seeds at the
# default run's scale (configs/arithmetic.yaml: 8 stages x 32 prompts x K=8, 100 held-out
# prompts), and on the built-in `larger` task with the same settings at 4 stages.
#
# Usage: configs/compare/sweep.sh [task:objective:seed ...]   (default: all 30 runs)
#   JOBS=2        runs at a time (each with run.threads=1)
#   RAFTLM=...    the command (default: raftlm; e.g. ".venv/bin/python -m raftlm")
#   DRY_RUN=1     print what would run (and what is skipped), run nothing
#
# Resumable: a run whose metrics.jsonl already holds its last stage is skipped, one that was
# started and stopped continues with `raftlm train --resume`, the rest start fresh. Stop the
# sweep at any time (Ctrl-C) and start it again. Each run logs to runs/compare/<task>/<name>.log;
# at the end `raftlm compare` draws one page per task under runs/compare/<task>/page/, runs of
# one objective (seeds apart) drawn as their mean with a min-max band.
#
# Cost, measured for sft on this project's 2-core CPU: ~4-5.5 min per arithmetic run; the group
# objectives train on all b*K = 256 responses per stage instead of ~20-30 and take several times
# longer. Budget some 3-4 hours for all 30 runs, two at a time.
set -euo pipefail
RAFTLM=${RAFTLM:-raftlm}
JOBS=${JOBS:-2}
DRY_RUN=${DRY_RUN:-0}
OBJECTIVES="sft reward_weighted raft++ reinforce_rej grpo"
SEEDS="0 1 2"
TASKS="arithmetic larger"

stages_of() {  # task -> its number of stages
  if [[ $1 == larger ]]; then echo 4; else echo 8; fi
}

finished() {  # run dir, stages -> success when metrics.jsonl holds the last stage
  [[ -f $1/metrics.jsonl ]] && python3 - "$1/metrics.jsonl" "$2" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
sys.exit(0 if any(r.get("stage") == int(sys.argv[2]) for r in rows) else 1)
EOF
}

run_one() {  # task:objective:seed
  IFS=: read -r task objective seed <<<"$1"
  local stages dir extra=()
  stages=$(stages_of "$task")
  dir=runs/compare/$task/$objective-s$seed
  if finished "$dir" "$stages"; then echo "skip (finished): $dir"; return; fi
  # reward_weighted keeps every distinct response and lets its weight (the 0/1 reward) decide;
  # with best_per_prompt + min_reward 1.0 it would train exactly like sft.
  if [[ $objective == reward_weighted ]]; then
    extra=(--set selection.strategy=top_k_per_prompt --set selection.top_k=8
           --set selection.min_reward=null)
  fi
  local cmd
  if [[ -f $dir/config.yaml ]]; then
    cmd=($RAFTLM train --resume "$dir")
  else
    cmd=($RAFTLM train --config configs/arithmetic.yaml --set "data.task=$task"
         --set "raft.stages=$stages" --set "training.objective=$objective"
         --set "run.seed=$seed" --set "run.output_dir=$dir" --set run.overwrite=true
         --set run.threads=1 --set tracking.report=false "${extra[@]}")
  fi
  if [[ $DRY_RUN == 1 ]]; then echo "would run: ${cmd[*]}"; return; fi
  mkdir -p "runs/compare/$task"
  echo "start: $dir"
  if OMP_NUM_THREADS=1 "${cmd[@]}" >>"$dir.log" 2>&1; then echo "done: $dir"
  else echo "FAILED: $dir (see $dir.log)"; fi
}
export -f run_one finished stages_of
export RAFTLM DRY_RUN

if (($#)); then jobs=("$@"); else
  jobs=()
  for task in $TASKS; do for seed in $SEEDS; do for objective in $OBJECTIVES; do
    jobs+=("$task:$objective:$seed")
  done; done; done
fi
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$0"' {}

[[ $DRY_RUN == 1 ]] && exit 0
for task in $TASKS; do
  dirs=()
  for objective in $OBJECTIVES; do for seed in $SEEDS; do
    dir=runs/compare/$task/$objective-s$seed
    finished "$dir" "$(stages_of "$task")" && dirs+=("$dir")
  done; done
  if ((${#dirs[@]})); then
    $RAFTLM compare "${dirs[@]}" --out "runs/compare/$task/page"
  fi
done
