#!/usr/bin/env bash
# Every GPU check of the project in one run (< 8 minutes on one H100/H200; nothing is downloaded):
#   1. the rollout benchmark at the paper's shapes (bench/bench_rollout.py: HF generate vs our student-only and
#      TRB rollouts, tokens/s, peak memory, roofline), table to $OUT/bench_rollout_gpu.md;
#   1b. where vllm is installed: the same benchmark with --engine vllm (static engine vs vLLM student-only and vLLM's TRB
#      pair model, x static and x HF generate, roofline fractions), table to $OUT/bench_rollout_vllm_gpu.md; without
#      vllm the table says "not measured" in every vLLM cell (up to 7 more minutes);
#   2. a 1-GPU torchrun smoke test (NCCL) on a tiny random Qwen3-architecture pair: 3 TRB steps and 3 OPD steps
#      on the static engine, each must finish with one metrics file and a loadable student.
# Usage (on the GPU machine, in the repository root):  OUT=/tmp/out bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
timeout 330 python bench/bench_rollout.py --out "$OUT/bench_rollout_gpu.md" 2>&1 | tee "$OUT/bench_rollout.log" \
  || echo "bench_rollout: FAILED or timed out (see $OUT/bench_rollout.log)"
echo "bench_rollout took $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"

start_v=$(date +%s)
if python -c "import vllm" 2>/dev/null; then
  timeout 420 python bench/bench_rollout.py --engine vllm --out "$OUT/bench_rollout_vllm_gpu.md" 2>&1 \
    | tee "$OUT/bench_rollout_vllm.log" || echo "bench_rollout --engine vllm: FAILED or timed out (see $OUT/bench_rollout_vllm.log)"
else
  printf '%s\n' "vllm is not installed here (pip install vllm): the vLLM rows are not measured" "" \
    "| variant | tokens/s | x HF generate | x static | % of roofline |" "|---|---|---|---|---|" \
    "| (e) vLLM student-only | not measured | not measured | not measured | not measured |" \
    "| (f) vLLM TRB pair | not measured | not measured | not measured | not measured |" > "$OUT/bench_rollout_vllm_gpu.md"
  cat "$OUT/bench_rollout_vllm_gpu.md"
fi
echo "bench_rollout --engine vllm took $(( $(date +%s) - start_v )) s" | tee -a "$OUT/gpu.txt"

python scripts/make_tiny_pair.py "$OUT/pair"
for method in trb opd; do
  t0=$(date +%s)
  timeout 120 torchrun --standalone --nproc_per_node 1 -m trb_exp.train "method=$method" model=hf \
    "model.student=$OUT/pair/student" "model.teacher=$OUT/pair/teacher" model.chat_template=none "model.plain_template='{prompt}'" \
    model.system_prompt=null \
    dataset=arithmetic logger=none trainer.max_steps=3 trainer.eval_every=0 trainer.eval_size=16 \
    trainer.progress=false rollout.engine=static rollout.compile=true "hydra.run.dir=$OUT/torchrun_$method" \
    > "$OUT/torchrun_$method.log" 2>&1 && status=ok || status=FAILED
  rows=$(grep -c '"train/loss"' "$OUT/torchrun_$method/metrics.jsonl" 2>/dev/null || echo 0)
  echo "torchrun 1 GPU, method=$method: $status, $rows training rows, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"
done
python -c "
from transformers import AutoModelForCausalLM
for m in ('trb', 'opd'):
    AutoModelForCausalLM.from_pretrained('$OUT/torchrun_' + m + '/student'); print('student loads:', m)
" | tee -a "$OUT/gpu.txt"
echo "gpu_check took $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
