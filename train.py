r"""Step 4: fine-tune the large (target) model on the chosen subset with the Hugging Face Trainer.

    # the paper's command (4 GPUs, FSDP), unchanged: the flags transformers 5 removed are translated
    torchrun --nproc_per_node=4 --master_port=1234 train.py \
        --model_name_or_path meta-llama/Llama-2-7b-hf --data_path data/10_low_lp1-alpaca-llama2-7b.json \
        --bf16 True --output_dir ./output --num_train_epochs 3 \
        --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 8 \
        --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 --save_total_limit 1 \
        --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" \
        --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
        --tf32 True --seed 42 --gradient_checkpointing True

    # tiny CPU run (about a minute on 2 cores; drop --max_steps for a full epoch, ~5 minutes):
    # a random-initialised model made locally, no download
    python examples/make_tiny_models.py --dataset data/sample_train.json --output_dir runs/models
    python train.py --model_name_or_path runs/models/target --data_path data/sample_train.json \
        --output_dir runs/target-ft --num_train_epochs 1 --max_steps 60 --per_device_train_batch_size 4 \
        --learning_rate 1e-3 --logging_steps 10 --save_strategy steps --save_steps 30

    # continue an interrupted run from its newest complete checkpoint in --output_dir (or give a checkpoint
    # folder); a checkpoint left half-written by a kill is skipped with a note (checkpoint_problem)
    python train.py ... --resume_from_checkpoint last

Records are Alpaca records (instruction, input, output) or chat records {"messages": [...]} (ShareGPT
"conversations" too), in any format data.py reads: JSON list, JSONL, Parquet, .gz of JSON/JSONL, a
datasets.save_to_disk folder or a hub dataset id (':SPLIT'); --instruction_field, --input_field,
--output_field and --messages_field map other column names. Alpaca records are formatted with the
Stanford Alpaca prompt and only the response tokens (+ eos) are trained on; chat records are rendered
with the tokenizer's chat template (or the built-in one) and only the assistant turns (+ end-of-turn
marker) are trained on (rendering.py; --chat_template, --response_boundary, --alpaca_as_chat). The
model, tokenizer and trainer_state.json are written to --output_dir; with --lora_r the LoRA adapter (and, with
--merge_lora True, the merged model in {output_dir}/merged). load_adapted loads such an adapter folder
as a model (its base, as training loaded it, plus the adapter): --merge_lora and evaluate.py use it.

Flags from transformers 4.x that 5.x removed are rewritten with a one-line notice
(translate_legacy_flags): --evaluation_strategy -> --eval_strategy, --warmup_ratio R ->
--warmup_steps R (a float below 1 is a ratio of the total steps in 5.x, rounded up as before),
--fsdp_transformer_layer_cls_to_wrap X -> --fsdp_config '{"transformer_layer_cls_to_wrap": ["X"]}'
(merged into any --fsdp_config given), and the deprecated --gradient_checkpointing ->
--activation_checkpointing, or under --fsdp the fsdp_config key activation_checkpointing (FSDP's
own, without the Trainer's redundant all-gather in the backward). On a machine without CUDA the
same command runs on the CPU: --tf32 and --fp16 are dropped with a warning, --bf16 becomes CPU
bfloat16 autocast, --fsdp is dropped ("falling back to plain data parallel": DDP over gloo when
launched by torchrun; --use_cpu is set under torchrun so the processes really train data parallel).

--padding_free packs each batch's records into one row (same records, same order, no padding; same loss
and gradients within float rounding); models that cannot take packed sequences are refused
(check_padding_free).

dump_pplxs.py (step 2) uses the same front-end: parse_args (with its own dataclass added), then fit
(load, tokenize, train, save; its perplexity callback added through ``prepare``) or, with --score_only,
setup (load and tokenize, the Trainer built, nothing trained).
"""

from __future__ import annotations

import sys

from small2large import finetune
from utils import run_cli


def parse_args(argv=None) -> tuple:
    """(model_args, data_args, training_args): the paper's flags, legacy ones translated (finetune.parse_args)."""
    return finetune.parse_args(argv, description=__doc__)


def main(args=None):
    if args is None or isinstance(args, (list, tuple)) and (not args or isinstance(args[0], str)):
        args = parse_args(args)
    with finetune.claimed_run(args[2]) as held:  # one run per --output_dir, before anything is loaded
        return finetune.fit(*args[:3], held=held)


if __name__ == "__main__":
    sys.exit(run_cli(main))
