#!/usr/bin/env bash
# The paper's Table 1 comparison at full scale, for one setting, as one command (GPU machine):
#   bash scripts/reproduce_paper.sh paper_0.6b_4b        # or paper_1.7b_8b; SEEDS=0,1,2 for seeded runs
# Runs every family's paper grid (conf/sweep: trb 15, fixed_blend 5, skd 9, veto 4, temp_warmup 6,
# sft_warmup 3, opd 1 = 43 runs per seed) one after another on the setting's preset, then writes
# outputs/paper/<setting>/comparison.md with the paper's Table 1 next to ours.
# NOT RUN by this project (no GPU was available). With Hugging Face decoding (one forward per token in
# Python) a 400-step run at 64 x 4 rollouts of up to 7,168 tokens takes days; a vLLM/SGLang-class engine
# is needed for the paper's scale. See the README's "Real models and benchmarks".
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=${1:?usage: bash scripts/reproduce_paper.sh paper_0.6b_4b|paper_1.7b_8b}
SEEDS=${SEEDS:-0}
OUT=${OUT:-outputs/paper/$SETTING}
[[ -f conf/experiment/$SETTING.yaml ]] || { echo "error: no experiment preset conf/experiment/$SETTING.yaml" >&2; exit 2; }
for fam in trb fixed_blend skd veto temp_warmup sft_warmup opd; do
  python -m trb_exp.train -m "experiment=$SETTING" "sweep=$fam" "seed=$SEEDS" "hydra.sweep.dir=$OUT/$fam"
done
python -m trb_exp.compare "$OUT" --out "$OUT" --paper docs/results/paper_table1.json --title "Paper reproduction, $SETTING"
