#!/usr/bin/env bash
# The measured comparison of docs/objectives.md: every objective on both compare configs (two
# runs at a time), then one `raftlm compare` page per task under runs/compare/<task>/.
# Usage: configs/compare/run.sh [task:objective ...]   (default: all ten runs)
# RAFTLM overrides the command (e.g. RAFTLM="python -m raftlm").
set -euo pipefail
RAFTLM=${RAFTLM:-raftlm}
OBJECTIVES="sft reward_weighted raft++ reinforce_rej grpo"
run_one() {  # task:objective
  local task=${1%%:*} objective=${1#*:} extra=()
  # reward_weighted keeps every distinct response and lets its weight (the 0/1 reward) decide;
  # with best_per_prompt + min_reward 1.0 it would train exactly like sft.
  if [[ $objective == reward_weighted ]]; then
    extra=(--set selection.strategy=top_k_per_prompt --set selection.top_k=4
           --set selection.min_reward=null)
  fi
  OMP_NUM_THREADS=1 $RAFTLM train --config "configs/compare/$task.yaml" \
    --set "training.objective=$objective" --set "run.output_dir=runs/compare/$task-$objective" \
    --set run.overwrite=true "${extra[@]}" > "runs/compare/$task-$objective.log" 2>&1
}
export -f run_one
export RAFTLM
mkdir -p runs/compare
if (($#)); then jobs=("$@"); else
  jobs=(); for task in arithmetic larger; do
    for objective in $OBJECTIVES; do jobs+=("$task:$objective"); done
  done
fi
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_one "$0"' {}
for task in arithmetic larger; do
  dirs=(); for objective in $OBJECTIVES; do
    [[ -f runs/compare/$task-$objective/metrics.jsonl ]] && dirs+=("runs/compare/$task-$objective")
  done
  ((${#dirs[@]})) && $RAFTLM compare "${dirs[@]}" --out "runs/compare/$task"
done
