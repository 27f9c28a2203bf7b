#!/usr/bin/env bash
# Every objective on both compare configs (two runs at a time), then one comparison page each.
# Usage: configs/compare/run.sh [raftlm command, default: raftlm]
set -euo pipefail
RAFTLM=${RAFTLM:-raftlm}
run_one() {  # task objective
  local task=$1 objective=$2 extra=()
  # reward_weighted keeps every distinct response and lets the weight (the 0/1 reward) decide;
  # with best_per_prompt + min_reward 1.0 it would be exactly sft.
  [[ $objective == reward_weighted ]] && extra=(--set selection.strategy=top_k_per_prompt
                                               --set selection.top_k=4 --set selection.min_reward=null)
  OMP_NUM_THREADS=1 $RAFTLM train --config "configs/compare/$task.yaml" \
    --set "training.objective=$objective" --set "run.output_dir=runs/compare/$task-$objective" \
    --set run.overwrite=true "${extra[@]}" > "runs/compare/$task-$objective.log" 2>&1
}
export -f run_one
export RAFTLM
mkdir -p runs/compare
for task in arithmetic larger; do
  for objective in sft reward_weighted raft++ reinforce_rej grpo; do echo "$task $objective"; done
done | xargs -P 2 -L 1 bash -c 'run_one "$0" "$1"'
for task in arithmetic larger; do
  $RAFTLM compare runs/compare/$task-{sft,reward_weighted,raft++,reinforce_rej,grpo} \
    --out "runs/compare/$task"
done
