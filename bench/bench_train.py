r"""Benchmark: training with --padding_free vs the paper's padded batches, same records, same model, same steps.

    # the README's CPU figure: the paper's Alpaca records, random Llama (hidden 256, 4 layers, BPE vocab 8000)
    python bench/bench_train.py --data data/alpaca_data.json
    # token-budget micro-batches against the paper's batches at its 4 x 8 records per step
    python bench/bench_train.py --data data/alpaca_data.json --gradient_accumulation_steps 8 --n_records 640 \
        --max_tokens_per_micro_batch 2048
    # quick smoke run on the shipped sample data (short records)
    python bench/bench_train.py --n_records 80 --vocab_size 1000
    # on a GPU: a ~1B random Llama, bf16 autocast, sdpa (then --attn_implementation flash_attention_2)
    python bench/bench_train.py --data alpaca_data.json --device cuda --bf16 --hidden_size 2048 \
        --num_layers 16 --num_heads 16 --n_records 4000 --attn_implementation sdpa

Both runs go through train.build_trainer (the code train.py and dump_pplxs.py train with) from the same
initial weights, with the same seed, so the Trainer's sampler gives both the same batches of
--batch_size random records in the same order; only the collator differs. The paper's: each batch
right-padded to its longest record (utils.pad_batch). --padding_free: the batch packed into one row
(utils.pack_batch). Printed side by side: optimizer steps, seconds, record tokens per second (padding
excluded, so the ratio is the speed-up), the share of padding in the processed tokens, the attention
matrix entries computed (sdpa and eager compute the whole packed row's T x T matrix and mask it; flash
attention's varlen kernel computes only the per-record blocks), and the largest relative difference
between the two runs' per-step training losses (the same training, up to float rounding). The first
--warmup_steps steps are not timed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large import finetune
from small2large.rendering import (
    SupervisedData,
    tokenize_records,  # noqa: E402
)
from utils import run_cli  # noqa: E402


class _Counting:
    """Wraps a collator: remembers (record tokens, processed tokens, attention entries) of every batch."""

    def __init__(self, collate, padding_free: bool):
        self.collate, self.padding_free, self.batches = collate, padding_free, []

    def __call__(self, instances):
        lens = [len(x["input_ids"]) for x in instances]
        real = sum(lens)
        if self.padding_free:
            self.batches.append((real, real, real * real))
        else:
            n = max(lens)
            self.batches.append((real, len(lens) * n, len(lens) * n * n))
        return self.collate(instances)


def run(model, tok, data, args, padding_free: bool, out_dir: str, budget: int | None = None) -> dict:
    """Train ``model`` for args.steps optimizer steps; returns timings, token counts and per-step losses.
    ``budget``: --max_tokens_per_micro_batch (the records of each step regrouped into packed micro-batches)."""
    import torch
    import transformers

    targs = finetune.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        seed=args.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not args.device.startswith("cuda"), bf16=args.bf16, dataloader_pin_memory=False,
        padding_free=padding_free, max_tokens_per_micro_batch=budget,
    )
    trainer = finetune.build_trainer(model, tok, data, targs)
    counter = _Counting(trainer.data_collator, padding_free)
    trainer.data_collator = counter
    step_end, losses = {}, {}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            step_end[state.global_step] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    trainer.add_callback(Clock())
    trainer.remove_callback(transformers.PrinterCallback)  # no per-step log lines
    trainer.train()
    w, ga = args.warmup_steps, args.gradient_accumulation_steps
    timed = counter.batches[w * ga: args.steps * ga]
    seconds = step_end[args.steps] - step_end[w]
    real = sum(b[0] for b in timed)
    processed, attention = sum(b[1] for b in timed), sum(b[2] for b in timed)
    micro_batches = float(args.gradient_accumulation_steps)
    if budget:  # what the packed micro-batches ran (over all steps, warm-up included), not the collator's batches
        st = trainer.packing_stats
        processed, attention = real * st.padded_tokens / st.real_tokens, attention * st.attention_work / st.default_attention_work
        micro_batches = st.micro_batches / st.steps
    return {"seconds": seconds, "real": real, "processed": processed,
            "attention": attention, "tokens_per_s": real / seconds, "micro_batches": micro_batches,
            "losses": [losses[k] for k in sorted(losses)], "steps": trainer.state.global_step}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/sample_train.json",
                   help="dataset (JSON list / JSONL, .gz ok); e.g. data/alpaca_data.json for Alpaca's lengths")
    p.add_argument("--n_records", type=int, default=400, help="the first N records are trained on (400)")
    p.add_argument("--batch_size", type=int, default=4, help="records per batch, both ways (4, the paper's)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step (1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps, both ways (0: one epoch of --n_records)")
    p.add_argument("--warmup_steps", type=int, default=3, help="first steps not timed (3)")
    p.add_argument("--model_dir", default=None, help="train this model instead of building a random one")
    p.add_argument("--hidden_size", type=int, default=256, help="random model's hidden size (256; ~2048 for 1B)")
    p.add_argument("--num_layers", type=int, default=4, help="random model's decoder layers (4; ~16 for 1B)")
    p.add_argument("--num_heads", type=int, default=4, help="random model's attention heads (4; 16 for 1B)")
    p.add_argument("--vocab_size", type=int, default=8000, help="BPE vocabulary trained on the records (8000)")
    p.add_argument("--model_max_length", type=int, default=512, help="truncation, tokens (512, the paper's)")
    p.add_argument("--max_tokens_per_micro_batch", type=int, default=0,
                   help="compare the paper's batches with token-budget micro-batches of this many tokens instead "
                        "of --padding_free (0): the records of each step regrouped, as train.py's flag does; "
                        "on a CPU 2048-4096 (large packed logits are slow there), on a GPU 16384")
    p.add_argument("--attn_implementation", default="sdpa", help="sdpa (default), eager or flash_attention_2")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="same for both runs (1e-4)")
    p.add_argument("--seed", type=int, default=42, help="Trainer seed: the same batches for both runs (42)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as train.py --bf16 (float32 weights)")
    p.add_argument("--repeats", type=int, default=1, help="train each way this many times, keep the fastest (1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if min(args.n_records, args.batch_size, args.gradient_accumulation_steps, args.repeats) < 1 or args.steps < 0 \
            or args.warmup_steps < 0:
        p.error("--n_records, --batch_size, --gradient_accumulation_steps, --repeats must be >= 1, --steps and --warmup_steps >= 0")
    if not args.steps:
        args.steps = args.n_records // (args.batch_size * args.gradient_accumulation_steps)
    if args.steps <= args.warmup_steps:
        p.error(f"{args.steps} optimizer steps: need more than --warmup_steps {args.warmup_steps} (raise --n_records)")
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    import torch
    import transformers

    from bench.bench_pplx import build_model, start

    records = start(args)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model0, tok = build_model(argparse.Namespace(**{**vars(args), "dtype": "fp32", "device": "cpu"}), records, tmp)
    if args.attn_implementation != model0.config._attn_implementation:
        model0.set_attn_implementation(args.attn_implementation)
    data = SupervisedData(*tokenize_records(records, tok, args.model_max_length))
    print(f"data: {len(data)} records of {args.data}, {sum(map(len, data.input_ids))} tokens, "
          f"{args.steps} optimizer steps of {args.batch_size * args.gradient_accumulation_steps} records, "
          f"device {args.device}{', bf16 autocast' if args.bf16 else ''}, attention {args.attn_implementation}, "
          f"{torch.get_num_threads()} threads")
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternate the two, keep each one's fastest run
            for name, pf in (("paper", False), ("packed", True)):
                budget = args.max_tokens_per_micro_batch or None
                r = run(copy.deepcopy(model0), tok, data, args, pf and not budget, os.path.join(tmp, name),
                        budget if pf else None)
                if name not in res or r["seconds"] < res[name]["seconds"]:
                    res[name] = r
    a, b = res["paper"], res["packed"]
    label = f"budget {args.max_tokens_per_micro_batch}" if args.max_tokens_per_micro_batch else "padding-free"
    rel = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    print(f"{'':28}{'paper (padded)':>16}{label:>16}")
    print(f"{'optimizer steps':28}{a['steps']:>16}{b['steps']:>16}")
    print(f"{'timed seconds':28}{a['seconds']:>16.2f}{b['seconds']:>16.2f}")
    print(f"{'record tokens/s':28}{a['tokens_per_s']:>16.0f}{b['tokens_per_s']:>16.0f}")
    print(f"{'padding share':28}{1 - a['real'] / a['processed']:>16.1%}{1 - b['real'] / b['processed']:>16.1%}")
    print(f"{'micro-batches per step':28}{a['micro_batches']:>16.2f}{b['micro_batches']:>16.2f}")
    print(f"{'attention entries (M)':28}{a['attention'] / 1e6:>16.1f}{b['attention'] / 1e6:>16.1f}")
    ratio = b["tokens_per_s"] / a["tokens_per_s"]
    print(f"{label} / paper: {ratio:.2f}x tokens/s   largest relative difference of the per-step "
          f"training losses: {rel:.1e}   final loss {a['losses'][-1]:.4f} / {b['losses'][-1]:.4f}")
    return {"ratio": ratio, "max_rel_loss_diff": rel, "padding_paper": 1 - a["real"] / a["processed"],
            "padding_packed": 1 - b["real"] / b["processed"], "micro_batches_packed": b["micro_batches"]}


if __name__ == "__main__":
    sys.exit(run_cli(main))
