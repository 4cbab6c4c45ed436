r"""Step 2: fine-tune the small (selector) model and dump every record's response perplexity
before training and after every epoch (P0, P1, P2, P3 for 3 epochs).

    # tiny CPU run (about 2 minutes on 2 cores: 2000 sample records; the model is made locally first)
    python examples/make_tiny_models.py --dataset data/sample_train.json --output_dir runs/models
    python dump_pplxs.py --model_name_or_path runs/models/selector --data_path data/sample_train.json \
        --output_dir runs/selector --dump_dir runs/dump-pplxs --num_train_epochs 3 \
        --per_device_train_batch_size 4 --learning_rate 1e-3 --model_max_length 256 --save_strategy no
    # the paper's command as written (4 GPUs, FSDP); --val_data_path must equal --data_path, as in the paper
    torchrun --nproc_per_node=4 --master_port=1234 dump_pplxs.py \
        --model_name_or_path meta-llama/Llama-2-7b-hf --data_path ./data/alpaca_data.json \
        --val_data_path ./data/alpaca_data.json --bf16 True --output_dir ./output --num_train_epochs 3 \
        --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 8 \
        --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 --save_total_limit 1 \
        --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" \
        --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
        --tf32 True --seed 42 --gradient_checkpointing True
    # continue a killed run; the dumps already written are kept
    python dump_pplxs.py ... --resume_from_checkpoint last

Outputs: ``{dump_dir}/epoch-pre.pkl``, ``epoch-1.pkl``, ... : each a pickled list of Python floats,
one perplexity per training record in dataset order (the paper's format, read by process_pickle.py).
With --dump_noprompt, ``{dump_dir}/noprompt/epoch-pre.pkl``, ...: the responses scored without their
prompt (for IFD; process_pickle.py --noprompt); --score_only dumps the model as it is, no training.

The training is train.py's (same flags, same data, same Trainer); a TrainerCallback runs ONE dump
routine before training (on_train_begin) and at the end of every epoch (on_epoch_end).

Perplexity of a record = exp(mean token cross-entropy over its scored (response) tokens), computed
in float32 from the model's logits. Scoring is fast and exact:
  * no gradients, model in eval mode (train mode restored afterwards);
  * records sorted by length into batches under a token budget (--pplx_max_tokens; default 1536 on
    a CPU, on a GPU derived from the free memory and the vocabulary size), dataset order restored
    afterwards (padding is a few percent of the processed tokens, vs ~30% for the paper's
    dataset-order batches of 4);
  * the vocabulary projection only on the scored positions (transformers' ``logits_to_keep``
    boolean mask), decided once per dump by a probe on one record, the same on every process; full
    logits where a model cannot take the mask; the cross-entropy in chunks of scored positions
    (bounded float32 memory with a 128K vocabulary);
  * out of memory: the budget is halved on every process and the batch retried (never a reason to
    switch to full logits); the budget used is logged;
  * under torchrun each process scores a strided share of the batches in lockstep (one forward and
    one small all-reduce per step on every process, a dummy batch where a share is done), so
    engines whose forward holds collectives (FSDP, DeepSpeed ZeRO-3) never mismatch them; inputs
    go to the Trainer's device (CPU offload keeps parameters on the CPU); rank 0 writes.
The result does not depend on the token budget, the record order or the number of processes
(within 1e-5 relative in float32).

A partial last epoch (training stopped by --max_steps or a fractional --num_train_epochs) is dumped
as ``epoch-{E:.2f}-partial.pkl`` (e.g. epoch-2.33-partial.pkl; cut, not rounded): it never replaces a
whole epoch's dump, and process_pickle.py / subset.py refuse it.

``{dump_dir}/manifest.json`` (manifest.py) records the run (a run id), the dataset (path, sha256,
record count), model, tokenizer, model_max_length, denominator, logits mode, world size, seed, the
rendering flags, column map and LoRA flags, package versions, and per dump (noprompt/epoch-*.pkl too)
its epoch, run, step and sha256; global rank 0 rewrites it atomically after each dump. A fresh run
(and --score_only) refuses a --dump_dir holding another run's dumps unless --overwrite_dumps (which
removes them); process_pickle.py and subset.py check the dumps against it.

Resuming (--resume_from_checkpoint) continues the same run (same run id) and keeps the dumps already
written: epoch-pre.pkl is not recomputed (the model has changed), and an epoch dump missed because
the run died right after an end-of-epoch checkpoint is written from that checkpoint. "last" takes
the newest COMPLETE checkpoint (a run killed while saving leaves a partial one: train.resolve_resume).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from small2large import checkpoints, finetune
from small2large.epoch_dumps import DumpArguments, PerplexityDumpCallback, score_only
from small2large.manifest import settle_manifest, start_manifest
from utils import UserError, fmt_share, is_main_rank, notice, run_cli

logger = logging.getLogger("dump_pplxs")


# ----------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    """train.py's flags (the paper's, legacy ones translated) plus DumpArguments."""
    return finetune.parse_args(argv, extra_dataclasses=(DumpArguments,), description=__doc__)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def main(args=None, callbacks: Sequence = ()):
    """Train as train.py does and dump the perplexities. ``args``: argv list or parse_args() tuple;
    ``callbacks``: extra TrainerCallbacks (tests use one to kill a run mid-epoch)."""
    if args is None or isinstance(args, list):
        args = parse_args(args)
    model_args, data_args, training_args, dump_args = args

    if dump_args.val_data_path is not None and not _same_file(dump_args.val_data_path, data_args.data_path):
        raise UserError(
            f"--val_data_path {dump_args.val_data_path} differs from --data_path {data_args.data_path}: the "
            "perplexities are those of the training records (as in the paper); pass the same file or omit it"
        )
    # one run per folder, claimed before anything is loaded (--score_only writes no --output_dir)
    owned = [dump_args.dump_dir] if dump_args.score_only else [training_args.output_dir, dump_args.dump_dir]
    with finetune.claimed_run(training_args, owned) as held:
        return train_and_dump(model_args, data_args, training_args, dump_args, held, callbacks)


def train_and_dump(model_args, data_args, training_args, dump_args, held: Sequence, callbacks: Sequence = ()) -> list[str]:
    """main() once the run holds its folders (``held``: finetune.claimed_run's claims)."""
    if dump_args.score_only:  # dumps of the model as it is, no training
        return score_only(model_args, data_args, training_args, dump_args, held)
    ckpt = checkpoints.resolve_resume(training_args, finetune.run_id_of(held))  # the newest complete one for "last"
    if ckpt is not None:
        training_args.resume_from_checkpoint = ckpt  # the manifest records the folder resumed from
    run = start_manifest(data_args, training_args, dump_args, ckpt) if is_main_rank() else None
    dumper = None

    def add_dumper(trainer, data, tokenizer):
        nonlocal dumper
        if data.n_fully_truncated:
            notice(f"warning: {fmt_share(data.n_fully_truncated, len(data))} are fully truncated: their "
                         "perplexity is dumped as 1.0 (as in the paper)")
        dumper = PerplexityDumpCallback(data, tokenizer.pad_token_id, dump_args, held).attach(trainer)
        if run is not None:
            dumper.manifest, dumper.replace = settle_manifest(run, data, tokenizer, model_args, data_args,
                                                               training_args, dump_args)
        if dump_args.dump_noprompt:  # the no-prompt pass for IFD
            dumper.attach_noprompt(data_args, tokenizer, training_args.model_max_length)
        for cb in (dumper, *callbacks):
            trainer.add_callback(cb)

    finetune.fit(model_args, data_args, training_args, prepare=add_dumper, held=held, resume=ckpt)
    return dumper.written


if __name__ == "__main__":
    sys.exit(run_cli(main))
