r"""Benchmark: dump_pplxs.py itself, timed per epoch, on a random model of a real model's shape.

    # CPU smoke run (a few seconds of training): tiny Llama, 64 sample records
    python bench/bench_dump_pplxs.py --data data/sample_train.json --n_records 64 -- \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --model_max_length 256
    # GPU (bench/gpu.sh): SmolLM2-1.7B's shape, 2,000 Alpaca records, the paper's flags, then the new ones
    python bench/bench_dump_pplxs.py --data alpaca_data.json --n_records 2000 --shape smollm2-1.7b -- \
        --bf16 True --per_device_train_batch_size 4 --gradient_accumulation_steps 8 \
        --max_tokens_per_micro_batch 16384 --attn_implementation torch_varlen --pplx_packing True

It trains a byte-level BPE tokenizer on the records, writes a random Llama of --shape (weights in bf16;
dump_pplxs.py loads them in float32 as it loads any model), then runs ``dump_pplxs.main`` on the first
--n_records records with the paper's step-2 settings (1 epoch, learning rate 2e-5, cosine, warm-up 3%,
logging every step, no checkpoints) plus the flags after ``--``. Printed: the seconds of training of each
epoch (from the epoch's start to its last optimizer step, the GPU synchronised; the perplexity dumps are
not in it), the seconds of each dump, record tokens per second and, on CUDA, the MFU of the training
(6 N tokens / s over a bf16 8192^3 matmul timed in this run; N the parameters without the input embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dump_pplxs  # noqa: E402
from bench.profiling import bf16_peak  # noqa: E402
from examples.make_tiny_models import corpus, train_bpe_tokenizer, write_tiny_model  # noqa: E402
from small2large.record_io import load_records  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, MLP, vocabulary
    "tiny": (64, 2, 4, 4, 176, 1000),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "smollm2-1.7b": (2048, 24, 32, 32, 8192, 49152),
}


class EpochClock(transformers.TrainerCallback):
    """Seconds from each epoch's start to its last optimizer step (GPU synchronised)."""

    def __init__(self):
        self.start, self.last, self.epochs = 0.0, 0.0, []

    def _now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.last = self._now()

    def on_epoch_end(self, args, state, control, **kwargs):  # runs after the dumper's: self.last is the last step
        self.epochs.append(self.last - self.start)


def make_model(out: str, records: list, shape: str) -> int:
    """A random Llama of ``shape`` and a BPE tokenizer trained on ``records`` in ``out``/model; returns N
    (the parameters without the input embedding)."""
    hidden, layers, heads, kv, mlp, vocab = SHAPES[shape]
    tok = train_bpe_tokenizer(corpus(records), vocab, os.path.join(out, "tok"), arch="llama")
    vocab = max(vocab, len(tok) + 1)
    n = write_tiny_model(os.path.join(out, "model"), tok, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         max_positions=2048, intermediate_size=mlp, num_kv_heads=kv, vocab_size=vocab,
                         dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    return n - vocab * hidden


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="records (a JSON list or JSONL file, .gz ok)")
    p.add_argument("--n_records", type=int, default=2000, help="the first N records are used (2000)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="the random model's shape (tiny)")
    p.add_argument("--epochs", type=int, default=1, help="--num_train_epochs (1)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    records = load_records(args.data)[:args.n_records]
    peak = bf16_peak()
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        n = make_model(tmp, records, args.shape)
        data = os.path.join(tmp, "data.json")
        with open(data, "w", encoding="utf-8") as f:
            json.dump(records, f)
        flags = ["--model_name_or_path", os.path.join(tmp, "model"), "--data_path", data,
                 "--output_dir", os.path.join(tmp, "out"), "--dump_dir", os.path.join(tmp, "dumps"),
                 "--num_train_epochs", str(args.epochs), "--learning_rate", "2e-5", "--weight_decay", "0.",
                 "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
                 "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", *args.extra]
        t = time.perf_counter()
        dump_pplxs.main(flags, callbacks=[clock])
        total = time.perf_counter() - t
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(tmp, "model"))
    from small2large.rendering import tokenize_records

    max_len = int(args.extra[args.extra.index("--model_max_length") + 1]) if "--model_max_length" in args.extra else 512
    tokens = sum(len(x) for x in tokenize_records(records, tokenizer, max_len)[0])
    out = {"shape": args.shape, "records": len(records), "tokens": tokens, "n_params": n, "total_s": total,
           "epoch_train_s": clock.epochs, "flags": args.extra, "peak_flops": peak}
    for e, s in enumerate(clock.epochs, 1):
        line = f"epoch {e}: {s:.1f} s of training, {tokens / s:.0f} record tokens/s"
        if peak:
            out.setdefault("mfu", []).append(6 * n * tokens / s / peak)
            line += f", MFU {100 * out['mfu'][-1]:.1f}% (N = {n / 1e9:.2f}B, peak {peak / 1e12:.0f} TFLOP/s)"
        print(line, flush=True)
    print(f"dump_pplxs.py in all (model load, dumps, training): {total:.1f} s; flags: {' '.join(args.extra)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
