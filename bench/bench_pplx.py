r"""Benchmark: dump_pplxs.py's perplexity scoring vs the paper's loop, same records, same model.

    # the issue's CPU target: 600 Alpaca records, random Llama (hidden 256, 4 layers, BPE vocab 8000)
    python bench/bench_pplx.py --data alpaca/data.json.gz   # the paper's released Alpaca data
    # quick smoke run on the sample data
    python bench/bench_pplx.py --data data/sample_train.json --n_records 50 --vocab_size 1000
    # on a GPU: a ~1B random Llama in bf16, GPU-sized token budget
    python bench/bench_pplx.py --data alpaca_data.json --device cuda --dtype bf16 --hidden_size 2048 \
        --num_layers 16 --num_heads 16 --max_tokens 32768 --n_records 4000

The paper's loop: records in dataset order, batches of 4 right-padded to the longest, full-vocabulary
logits at every position, loss summed per record and divided by its number of non-zero token losses.
Ours (dump_pplxs.score_pplxs): records sorted by length into batches under a token budget, logits
only at the scored positions, dataset order restored. Printed side by side: record tokens per
second (padding excluded, so the ratio is the speed-up), the share of padding in the processed
tokens, and the largest relative difference between the two sets of perplexities.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profiling import bf16_peak, gpu_profiler, print_profile, summarize_profile  # noqa: E402
from small2large import attention  # noqa: E402
from small2large.record_io import load_records  # noqa: E402
from small2large.rendering import (
    SupervisedData,
    tokenize_records,  # noqa: E402
)
from utils import IGNORE_INDEX, UserError, run_cli


def paper_loop(model, data: SupervisedData, pad_token_id: int, batch_size: int = 4, autocast=None):
    """The paper's scoring loop (baseline): returns (perplexities in dataset order, processed tokens)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from small2large.batching import DataCollatorForSupervisedDataset, SupervisedDataset

    ds, collate = SupervisedDataset(data), DataCollatorForSupervisedDataset(pad_token_id)
    device = next(model.parameters()).device
    out, processed = [], 0
    model.eval()
    with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
        for s in range(0, len(ds), batch_size):
            b = collate([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], b["labels"][:, 1:]
            loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                                   reduction="none")  # [B, T-1], 0 at ignored positions
            n = (loss != 0).sum(dim=1)
            mean = torch.where(n > 0, loss.sum(dim=1) / n.clamp(min=1), torch.zeros_like(n, dtype=loss.dtype))
            out += torch.exp(mean).cpu().tolist()
            processed += b["input_ids"].numel()
    return out, processed


def build_model(args, records, tmp):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.make_tiny_models import corpus, train_bpe_tokenizer, write_tiny_model
    from small2large.models import add_missing_special_tokens

    model_dir = args.model_dir
    if model_dir is None:
        tok = train_bpe_tokenizer(corpus(records), args.vocab_size, os.path.join(tmp, "tok"), arch="llama")
        model_dir = os.path.join(tmp, "model")
        n = write_tiny_model(model_dir, tok, arch="llama", hidden_size=args.hidden_size, num_layers=args.num_layers,
                             num_heads=args.num_heads, max_positions=max(1024, args.model_max_length), seed=0)
        print(f"model: random Llama, hidden {args.hidden_size}, {args.num_layers} layers, "
              f"{n / 1e6:.1f}M parameters, vocab {len(tok)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    add_missing_special_tokens(tokenizer, model)
    return model.to(args.device).eval(), tokenizer


def start(args) -> list[dict]:
    """What every benchmark does first: check --device, set --threads, read the first --n_records records."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_records(args.data)[: args.n_records]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset (JSON list / JSONL, .gz ok), e.g. the paper's Alpaca")
    p.add_argument("--n_records", type=int, default=600, help="first N records are scored (600 = the issue's)")
    p.add_argument("--model_dir", default=None, help="score with this model instead of building a random one")
    p.add_argument("--hidden_size", type=int, default=256, help="random model's hidden size (256; ~2048 for 1B)")
    p.add_argument("--num_layers", type=int, default=4, help="random model's decoder layers (4; ~16 for 1B)")
    p.add_argument("--num_heads", type=int, default=4, help="random model's attention heads (4; 16 for 1B)")
    p.add_argument("--vocab_size", type=int, default=8000, help="BPE vocabulary trained on the records (8000)")
    p.add_argument("--model_max_length", type=int, default=512, help="truncation, tokens (512, the paper's)")
    p.add_argument("--batch_size", type=int, default=4, help="the paper's loop: records per batch (4)")
    p.add_argument("--max_tokens", type=int, default=1536,
                   help="ours: token budget per batch (1536 on CPU; 16k-64k on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights' dtype (fp32)")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the best (1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--packed", action="store_true",
                   help="ours: records packed into rows (score_pplxs packed=True, dump_pplxs.py --pplx_packing)")
    p.add_argument("--attn_implementation", default=None,
                   help="attention of the model for ours (e.g. torch_varlen on a GPU; default: transformers')")
    p.add_argument("--json", default=None, help="also write the figures here (bench/gpu_table.py reads them)")
    p.add_argument("--skip_paper", action="store_true", help="time ours only (the paper's loop is slow on a GPU)")
    p.add_argument("--ours_repeats", type=int, default=0,
                   help="time ours this many times (0: --repeats; the paper's loop is the slow one)")
    p.add_argument("--liger", action="store_true",
                   help="CUDA: liger-kernel's RMSNorm, RoPE and SwiGLU in the model for both (what dump_pplxs.py "
                        "--use_liger_kernel gives its scoring passes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for ours")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: torch.profiler over one more pass of ours: GPU time by kind of kernel, idle time")
    args = p.parse_args(argv)
    if args.n_records < 1 or args.batch_size < 1 or args.max_tokens < 1 or args.repeats < 1 or args.ours_repeats < 0:
        p.error("--n_records, --batch_size, --max_tokens and --repeats must be >= 1")
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    import torch

    from small2large.scoring import score_pplxs

    records = start(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(args, records, tmp)
    data = SupervisedData(*tokenize_records(records, tok, args.model_max_length))
    real = sum(len(x) for x in data.input_ids)
    print(f"data: {len(data)} records of {args.data}, {real} tokens, device {args.device}, dtype {args.dtype}, "
          f"{torch.get_num_threads()} threads")

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    default_impl = model.config._attn_implementation
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
    scorer = torch.compile(model) if args.compile else model

    def ours(d):
        if args.attn_implementation:
            if args.attn_implementation == attention.TORCH_VARLEN:
                attention.register_torch_varlen()
            model.set_attn_implementation(args.attn_implementation)
        try:
            return score_pplxs(scorer, d, tok.pad_token_id, max_tokens=args.max_tokens, denominator="nonzero",
                               progress=False, packed=args.packed)
        finally:
            model.set_attn_implementation(default_impl)

    warm = SupervisedData(data.input_ids[:8], data.labels[:8])  # warm-up (allocator, kernels), not timed
    if not args.skip_paper:
        paper_loop(model, warm, tok.pad_token_id, args.batch_size)
    ours(warm)
    t_paper = t_ours = math.inf
    for k in range(max(args.repeats, args.ours_repeats or args.repeats)):
        if k < args.repeats and not args.skip_paper:
            sync()
            t = time.perf_counter()
            p_paper, processed_paper = paper_loop(model, data, tok.pad_token_id, args.batch_size)
            sync()
            t_paper = min(t_paper, time.perf_counter() - t)
        if k < (args.ours_repeats or args.repeats):
            sync()
            t = time.perf_counter()
            p_ours, stats = ours(data)
            sync()
            t_ours = min(t_ours, time.perf_counter() - t)
    if args.skip_paper:
        print(f"ours: {len(data)} records, {stats.n_batches} batches, {t_ours:.2f} s, {real / t_ours:.0f} record "
              f"tokens/s, padding {stats.padding_share:.1%} (token budget {args.max_tokens}, logits {stats.logits}, "
              f"packed {args.packed}, attention {args.attn_implementation or default_impl}, liger {args.liger}, "
              f"compile {args.compile})")
        t_paper, processed_paper, rel = math.nan, real, math.nan
    else:
        rel = max(abs(a - b) / abs(b) for a, b in zip(p_ours, p_paper))
        print(f"{'':24}{'paper loop':>14}{'ours':>14}")
        print(f"{'batches':24}{math.ceil(len(data) / args.batch_size):>14}{stats.n_batches:>14}")
        print(f"{'seconds':24}{t_paper:>14.2f}{t_ours:>14.2f}")
        print(f"{'record tokens/s':24}{real / t_paper:>14.0f}{real / t_ours:>14.0f}")
        print(f"{'padding share':24}{1 - real / processed_paper:>14.1%}{stats.padding_share:>14.1%}")
        print(f"speed-up: {t_paper / t_ours:.2f}x   max relative difference of perplexities: {rel:.2e}   "
              f"(token budget {args.max_tokens}, logits {stats.logits}, packed {args.packed}, "
              f"attention {args.attn_implementation or default_impl})")
    mfu_ours = mfu_paper = None
    if args.device.startswith("cuda"):  # MFU = 2 N tokens/s over a bf16 matmul peak timed now
        n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        peak = bf16_peak()
        mfu_ours, mfu_paper = 2 * n * real / t_ours / peak, 2 * n * real / t_paper / peak
        paper = "" if args.skip_paper else f"paper loop {mfu_paper:.1%}, "
        print(f"MFU: {paper}ours {2 * n * real / t_ours / peak:.1%} "
              f"(N = {n / 1e9:.3f}B, peak {peak / 1e12:.0f} TFLOP/s), peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.profile and args.device.startswith("cuda"):
        sync()
        with gpu_profiler() as prof:
            t = time.perf_counter()
            ours(data)
            sync()
            wall = time.perf_counter() - t
        print_profile("ours (one pass over the records)", summarize_profile(prof, wall, 1))
    res = {"speedup": t_paper / t_ours, "max_rel_diff": rel, "padding_ours": stats.padding_share,
           "tokens_per_s_ours": real / t_ours, "tokens_per_s_paper": real / t_paper, "mfu_ours": mfu_ours,
           "mfu_paper": mfu_paper, "packed": args.packed, "liger": args.liger, "compile": args.compile,
           "attention": args.attn_implementation or default_impl, "max_tokens": args.max_tokens}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
