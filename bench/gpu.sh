#!/usr/bin/env bash
# GPU checks of small2large/packing.py (issue 17, "The GPU does the work"), ~3 minutes on one H200:
#   1. tests/test_packing.py -m gpu: torch's varlen flash kernel (attention "torch_varlen", registered by
#      small2large/packing.py) on packed rows against sdpa, bf16;
#   2-3. bench/bench_packing.py on a random 1.1B Llama (and a 1.7B with a 49,152 vocabulary) (hidden 2048, 22 layers, 32 heads, 4 kv heads, MLP 5632,
#      vocab 32000; TinyLlama's shape), bf16 autocast, the paper's 4 records x 8 accumulation steps, records
#      ~ lognormal around 180 tokens: the padded path (sdpa) against token-budget micro-batches (16384 tokens)
#      with sdpa (capped rows, dense document mask), torch_varlen, and flash_attention_2 when flash-attn is
#      installed. Prints tokens/s, ratio, micro-batches per step, padding, attention entries, loss difference,
#      peak memory and MFU (against a bf16 8192^3 matmul timed in the same run), with --optim adamw_torch (the
#      paper's) and adamw_torch_fused;
#   4. bench/bench_pplx.py: the scoring engine on the sample data, length-sorted and packed (tokens/s, padding, MFU).
# Logs go to $OUT (the device tool's output folder) if set, else runs/gpu-packing/.
#     bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-packing}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. GPU test: torch_varlen vs sdpa (bf16)" | tee "$OUT/pytest-gpu.log"
SMALL2LARGE_REQUIRE_GPU=1 timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_packing.py 2>&1 \
  | tail -n 30 | tee -a "$OUT/pytest-gpu.log"

echo "== 2. bench: 1.1B Llama, bf16, 4 x 8 records per step" | tee "$OUT/bench.log"
for optim in adamw_torch adamw_torch_fused; do
  echo "-- --optim $optim" | tee -a "$OUT/bench.log"
  timeout 240 python3 bench/bench_packing.py --device cuda --bf16 --optim "$optim" \
    --hidden 2048 --layers 22 --heads 32 --kv_heads 4 --intermediate 5632 --vocab 32000 \
    --steps 5 --warmup 2 --max_tokens 16384 --packed_attn sdpa,torch_varlen,flash_attention_2 \
    --json "$OUT/bench-1b-$optim.json" 2>&1 | grep -v "^{'" | tee -a "$OUT/bench.log"
done

echo "== 3. bench: 1.7B Llama (SmolLM2-1.7B shape, vocab 49152), bf16, 4 x 8 records per step" | tee -a "$OUT/bench.log"
timeout 200 python3 bench/bench_packing.py --device cuda --bf16 --optim adamw_torch_fused \
  --hidden 2048 --layers 24 --heads 32 --kv_heads 32 --intermediate 8192 --vocab 49152 \
  --steps 5 --warmup 2 --max_tokens 16384 --packed_attn torch_varlen \
  --json "$OUT/bench-1.7b.json" 2>&1 | grep -v "^{'" | tee -a "$OUT/bench.log"

echo "== 4. scoring (score_pplxs): length-sorted batches, then packed with torch_varlen; 1.1B-shape Llama, bf16" | tee -a "$OUT/bench.log"
for packed in "" "--packed --attn_implementation torch_varlen"; do
  # shellcheck disable=SC2086
  timeout 100 python3 bench/bench_pplx.py --data data/sample_train.json --n_records 2000 --device cuda --dtype bf16 \
    --hidden_size 2048 --num_layers 22 --num_heads 32 --max_tokens 32768 $packed 2>&1 | tail -n 8 | tee -a "$OUT/bench.log"
done
