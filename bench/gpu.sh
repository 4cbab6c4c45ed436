#!/usr/bin/env bash
# Every GPU figure of issue 17 ("The GPU does the work") in one run, about 6.5 minutes on one H200 (the first
# run, with a +compile path as well, took 460 s), ending with one table of them all ($OUT/table.md,
# bench/gpu_table.py). Logs in $OUT (the device tool's output folder) if set, else runs/gpu/. ALPACA: a JSON
# list of Alpaca records (the README's figures: the first 2,000 of alpaca_data.json); default: the sample data.
#   1. bench_packing.py, random 1.1B Llama (TinyLlama's shape), bf16 autocast, the paper's 4 x 8 records per
#      step: padded (today) against token-budget micro-batches with torch_varlen and +liger (add
#      torch_varlen+compile to --packed_attn for --torch_compile: a minute more);
#   2. the same with torch.profiler: where one step's time goes, padded and packed;
#   3. bench_pplx.py, scoring 2,000 records with a 1.48B Llama in bf16: length-sorted, packed, packed + liger;
#   4. bench_dump_pplxs.py: dump_pplxs.py itself on 2,000 records with SmolLM2-1.7B's shape (vocab 49,152),
#      the paper's flags plus the GPU ones: seconds of training per epoch;
#   5. GPU tests (-m gpu): torch_varlen against sdpa; liger-kernel and torch.compile against the padded path;
#      packed scoring against the float32 reference.
#     ALPACA=data/alpaca_data.json bash bench/gpu.sh
#     SECTIONS="1 3" bash bench/gpu.sh        # some of them
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
ALPACA="${ALPACA:-data/sample_train.json}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>/dev/null || echo "liger-kernel: not installed"
  python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
  echo "records: $ALPACA"
} 2>&1 | tee "$OUT/env.txt"
SECTIONS="${SECTIONS:-1 2 3 4 5}"
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
LLAMA_1B=(--hidden 2048 --layers 22 --heads 32 --kv_heads 4 --intermediate 5632 --vocab 32000)

if want 1; then
  echo "== 1. training: 1.1B Llama, bf16, 4 x 8 records per step, --optim adamw_torch_fused" | tee "$OUT/bench.log"
  timeout 200 python3 bench/bench_packing.py --device cuda --bf16 --optim adamw_torch_fused "${LLAMA_1B[@]}" \
    --steps 5 --warmup 3 --max_tokens 16384 --packed_attn torch_varlen,torch_varlen+liger \
    --json "$OUT/bench-1.1b.json" 2>&1 | tee "$OUT/bench-1.1b.log" | grep -vE "^\{'|^W[0-9]{4} " | tee -a "$OUT/bench.log"
fi

if want 2; then
  echo "== 2. profile of a training step (1.1B): padded, packed torch_varlen, + liger" | tee -a "$OUT/bench.log"
  timeout 100 python3 bench/bench_packing.py --device cuda --bf16 --optim adamw_torch_fused "${LLAMA_1B[@]}" \
    --steps 2 --warmup 2 --max_tokens 16384 --packed_attn torch_varlen,torch_varlen+liger --profile \
    2>&1 | grep -vE "^\{'|^W[0-9]{4} " | tee "$OUT/profile.log" | tee -a "$OUT/bench.log"
fi

if want 3; then
  echo "== 3. scoring 2,000 records, 1.48B Llama in bf16, token budget 32768" | tee -a "$OUT/bench.log"
  PPLX=(--data "$ALPACA" --n_records 2000 --device cuda --dtype bf16 --hidden_size 2048 --num_layers 22 --num_heads 32
        --max_tokens 32768)
  timeout 90 python3 bench/bench_pplx.py "${PPLX[@]}" --ours_repeats 2 --json "$OUT/pplx-1.json" 2>&1 | tail -n 8 \
    | tee -a "$OUT/bench.log"
  n=1
  for extra in "--packed --attn_implementation torch_varlen" "--packed --attn_implementation torch_varlen --liger --profile"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    timeout 60 python3 bench/bench_pplx.py "${PPLX[@]}" --skip_paper --ours_repeats 3 --json "$OUT/pplx-$n.json" $extra 2>&1 \
      | grep -E "^ours|^MFU|^profile|^    [a-z]|^ +[0-9.]+  |Error" | tee -a "$OUT/bench.log"
  done
fi

if want 4; then
  echo "== 4. dump_pplxs.py, 2,000 records, SmolLM2-1.7B shape, 1 epoch, the paper's 4 x 8 records per step" | tee -a "$OUT/bench.log"
  n=0
  for extra in "" "--use_liger_kernel True"; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    timeout 120 python3 bench/bench_dump_pplxs.py --data "$ALPACA" --n_records 2000 --shape smollm2-1.7b \
      --json "$OUT/dump-$n.json" -- \
      --bf16 True --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --optim adamw_torch_fused \
      --max_tokens_per_micro_batch 16384 --attn_implementation torch_varlen --pplx_packing True $extra 2>&1 \
      | grep -E "^epoch|in all|perplexities|Error|error" | tee -a "$OUT/bench.log"
  done
fi

if want 5; then
  echo "== 5. GPU tests" | tee "$OUT/pytest-gpu.log"
  SMALL2LARGE_REQUIRE_GPU=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -W ignore \
    tests/test_packing.py tests/test_gpu_fused.py >> "$OUT/pytest-gpu.log" 2>&1
  grep -E "passed|failed|^E |Error" "$OUT/pytest-gpu.log" | tail -n 20
fi

echo "== the table (bench/gpu_table.py $OUT)"
python3 bench/gpu_table.py "$OUT" | tee "$OUT/table.md"
