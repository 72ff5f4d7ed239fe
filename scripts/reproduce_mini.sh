#!/usr/bin/env bash
# The miniature study, from scratch, on a 2-core CPU (docs/results/mini):
#   0. prepare (only if STAGES names it): rebuild the two shipped tiny pairs a and b, side by side (measured:
#      867 s for a alone, 1,978 s for b next to other jobs). The default stages use the shipped pairs.
#   1. sweep:  every method family's grid on mini_a, seed 0 (44 runs);
#   2. select: each family's best configuration on mini_a = highest final pass@1 of its seed-0 run;
#   3. seeds:  those configurations (OPD's too; not offline_kd, a reference outside the paper's table) on
#              seeds 1,2 of mini_a (seed 0 is the sweep's run) and, unchanged, on seeds 0,1,2 of mini_b
#              (14 + 21 runs; mini_b is never used for selection);
#   4. report: the runs packed into docs/results/mini/{mini_a,mini_b}/runs.jsonl.gz (scripts/collect_runs.py),
#              python -m trb_exp.compare per setting -> docs/results/mini/{mini_a,mini_b}/comparison.md.
# Sweep points run JOBS at a time through Hydra's joblib launcher (one torch thread each); the families of a
# stage run one after another. Measured runtime: see README ("Miniature study").
#   bash scripts/reproduce_mini.sh                   # everything
#   STAGES="report" bash scripts/reproduce_mini.sh   # only some stages (report alone, on a fresh clone:
#                                                    # re-renders the committed reports from the committed data files)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/study}
DOCS=${DOCS:-docs/results/mini}
JOBS=${JOBS:-2}
SEEDS_A=${SEEDS_A:-1,2}      # on top of the sweep's seed 0
SEEDS_B=${SEEDS_B:-0,1,2}
SEEDED=${SEEDED:-"opd trb fixed_blend skd veto temp_warmup sft_warmup"}
STAGES=${STAGES:-"sweep select seeds report"}
export OMP_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HYDRA_FULL_ERROR=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts/*.py import trb_exp even without pip install -e
mkdir -p "$OUT/logs"

# One multirun (a family's grid or seeds), its points JOBS at a time on the joblib launcher; logs to $OUT/logs/<tag>.log.
job() {
  local tag=$1; shift
  python -m trb_exp.train -m hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS" logger=none "$@" \
    > "$OUT/logs/$tag.log" 2>&1 && echo "done $tag" || { echo "FAILED $tag"; exit 1; }
}

start=$(date +%s)
if [[ $STAGES == *prepare* ]]; then
  python -m trb_exp.prepare --pair a --threads 1 > "$OUT/logs/prepare_a.log" 2>&1 &
  python -m trb_exp.prepare --pair b --threads 1 > "$OUT/logs/prepare_b.log" 2>&1
  wait
fi
if [[ $STAGES == *sweep* ]]; then
  for fam in trb_mini skd_mini temp_warmup fixed_blend_mini veto sft_warmup opd offline_kd; do
    job "sweep_$fam" experiment=mini_a "sweep=$fam" seed=0 "hydra.sweep.dir=$OUT/mini_a/sweep/${fam%_mini}"
  done
fi
if [[ $STAGES == *select* ]]; then
  # the miniature study selected on the test set (it had no validation split); select_best now defaults to --on val
  python scripts/select_best.py "$OUT/mini_a/sweep" --on test | tee "$OUT/mini_a/best.txt"
fi
if [[ $STAGES == *seeds* ]]; then
  for setting in mini_b mini_a; do
    seeds=$([[ $setting == mini_a ]] && echo "$SEEDS_A" || echo "$SEEDS_B")
    while read -r fam overrides; do
      [[ " $SEEDED " == *" $fam "* ]] || continue
      job "seeds_${setting}_$fam" "experiment=$setting" $overrides "seed=$seeds" "hydra.sweep.dir=$OUT/$setting/seeds/$fam"
    done < "$OUT/mini_a/best.txt"
  done
fi
if [[ $STAGES == *report* ]]; then
  for setting in mini_a mini_b; do
    pair=$([[ $setting == mini_a ]] && echo embedded || echo embedded_b)
    teacher=$(python -c "import json; print(json.load(open('trb_exp/assets/$pair/prepare.json'))['teacher']['eval']['pass@1'])")
    if [[ -d $OUT/$setting ]]; then  # else: re-render the committed runs' reports
      rm -f "$DOCS/$setting/runs.jsonl.gz" && python scripts/collect_runs.py "$OUT/$setting" "$DOCS/$setting/runs.jsonl.gz"
    fi
    python -m trb_exp.compare "$DOCS/$setting/runs.jsonl.gz" --out "$DOCS/$setting" --teacher-pass1 "$teacher" \
      --paper docs/results/paper_table1.json --title "Miniature study, $setting"
  done
fi
echo "reproduce_mini: stages [$STAGES] took $(( $(date +%s) - start )) s"
