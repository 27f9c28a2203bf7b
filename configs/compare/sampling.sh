#!/usr/bin/env bash
# The sampling modes compared (issue 18, docs/sampling.md): raft.collector fixed vs dynamic vs
# gvm on the default task (configs/arithmetic.yaml) with sft, 3 seeds each, and with grpo, one
# seed each; on the built-in `larger` (4 stages) and on the low-signal `multiplication` (stage-1
# pass@8 about 0.16 for the embedded model) the modes with sft, one seed.
# Judged by held-out accuracy against cumulative generated tokens (`raftlm compare` plots it).
#
# Usage: configs/compare/sampling.sh [task:mode:objective:seed ...]   (default: all 22 runs)
#   mode is fixed, dynamic or gvm, optionally with "+all": keep every accepted response
#   (selection.strategy=top_k_per_prompt, top_k=16) instead of the best one per prompt. gvm
#   gives accepted prompts more samples, which best_per_prompt would throw away, so the
#   default list runs sft with gvm+all, and fixed+all as its control.
#   STAGES=8      stages per run (default: 8 on arithmetic, 4 on larger)
#   EVERY=2       evaluate after every EVERY stages (the first and last always)
#   JOBS=1        runs at a time (each with run.threads=1)
#   OUT=runs/sampling   where runs, logs and the compare pages go
#   RAFTLM=...    the command (default: raftlm; e.g. ".venv/bin/python -m raftlm")
#   DRY_RUN=1     print what would run (and what is skipped), run nothing
#
# Resumable: a run whose metrics.jsonl holds its last stage is skipped, one that was started
# and stopped continues with `raftlm train --resume`, the rest start fresh. At the end
# `raftlm compare` draws one page per task under $OUT/<task>/page/.
set -euo pipefail
RAFTLM=${RAFTLM:-raftlm}
JOBS=${JOBS:-1}
EVERY=${EVERY:-2}
OUT=${OUT:-runs/sampling}
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-}

stages_of() {  # task -> its number of stages
  if [[ -n $STAGES ]]; then echo "$STAGES"; elif [[ $1 == larger ]]; then echo 4; else echo 8; fi
}

finished() {  # run dir, stages -> success when metrics.jsonl holds the last stage
  [[ -f $1/metrics.jsonl ]] && python3 - "$1/metrics.jsonl" "$2" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
sys.exit(0 if any(r.get("stage") == int(sys.argv[2]) for r in rows) else 1)
EOF
}

run_one() {  # task:mode:objective:seed
  IFS=: read -r task mode objective seed <<<"$1"
  local stages dir extra=()
  stages=$(stages_of "$task")
  dir=$OUT/$task/${mode/+/-}-$objective-s$seed
  if finished "$dir" "$stages"; then echo "skip (finished): $dir"; return; fi
  if [[ $mode == *+all ]]; then
    extra=(--set selection.strategy=top_k_per_prompt --set selection.top_k=16)
  fi
  local cmd
  if [[ -f $dir/config.yaml ]]; then
    cmd=($RAFTLM train --resume "$dir")
  else
    cmd=($RAFTLM train --config configs/arithmetic.yaml --set "data.task=$task"
         --set "raft.stages=$stages" --set "raft.collector=${mode%+all}"
         --set "training.objective=$objective" --set "evaluation.every=$EVERY"
         --set "run.seed=$seed" --set "run.output_dir=$dir" --set run.overwrite=true
         --set run.threads=1 --set tracking.report=false "${extra[@]}")
  fi
  if [[ $DRY_RUN == 1 ]]; then echo "would run: ${cmd[*]}"; return; fi
  mkdir -p "$OUT/$task"
  echo "start: $dir"
  if OMP_NUM_THREADS=1 "${cmd[@]}" >>"$dir.log" 2>&1; then echo "done: $dir"
  else echo "FAILED: $dir (see $dir.log)"; fi
}
export -f run_one finished stages_of
export RAFTLM DRY_RUN EVERY OUT STAGES

if (($#)); then jobs=("$@"); else
  jobs=()
  for seed in 0 1 2; do for mode in fixed dynamic gvm+all fixed+all; do
    jobs+=("arithmetic:$mode:sft:$seed")
  done; done
  for mode in fixed dynamic gvm; do jobs+=("arithmetic:$mode:grpo:0"); done
  for mode in fixed dynamic gvm+all; do jobs+=("larger:$mode:sft:0"); done
  for mode in fixed dynamic gvm+all fixed+all; do jobs+=("multiplication:$mode:sft:0"); done
fi
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$0"' {}

[[ $DRY_RUN == 1 ]] && exit 0
for task in arithmetic larger multiplication; do
  dirs=()
  for job in "${jobs[@]}"; do
    IFS=: read -r jtask mode objective seed <<<"$job"
    dir=$OUT/$jtask/${mode/+/-}-$objective-s$seed
    [[ $jtask == "$task" ]] && finished "$dir" "$(stages_of "$task")" && dirs+=("$dir")
  done
  if ((${#dirs[@]})); then
    $RAFTLM compare "${dirs[@]}" --out "$OUT/$task/page"
  fi
done
