r"""Benchmark: token-budget micro-batches (small2large/packing.py) vs the paper's padded micro-batches,
same records, same model, same optimizer steps, the real transformers Trainer both ways.

    # CPU, tiny random Llama (seconds)
    python bench/bench_packing.py
    # CPU, the figure of the report: hidden 256, 4 layers
    python bench/bench_packing.py --hidden 256 --layers 4 --heads 4 --kv_heads 4 --vocab 8000 --steps 6
    # GPU: bench/gpu.sh (a 1.1B Llama in bf16; sdpa padded vs packed sdpa / torch_varlen / flash)

The paper's setting: 4 records per micro-batch x 8 accumulation steps = 32 records per optimizer step.
Records: --data (a JSON list of Alpaca records {instruction, input, output}; lengths from --tokenizer if
given, else ~4 characters per token; token ids are random, the model is random) or synthesized:
lognormal lengths around 180 tokens within 40..600, the first ~40% of each record a prompt (labels
IGNORE_INDEX). Each path starts from the same initial weights with the same seed, so the Trainer's
sampler gives both the same records per step; the padded path runs them as 8 right-padded
micro-batches, the packed one regroups them under --max_tokens (TokenBudgetTrainer).

Printed side by side: record tokens per second over the timed steps (padding excluded; the first
--warmup steps are not timed; a step's time runs from the end of the previous step, so fetching and
regrouping are included), the ratio, micro-batches per step, the padding share of the tokens run,
attention score entries (packing.packed_attention_work; dense for the padded path and masked rows,
per record for varlen kernels), the largest relative difference of the two runs' per-step losses,
peak GPU memory, and on CUDA the MFU = 6 N tokens/s / peak, N the parameters without the input
embedding, the peak a bf16 matmul of two 8192 x 8192 matrices timed in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profiling import bf16_peak, gpu_profiler, print_profile, summarize_profile  # noqa: E402
from small2large import (
    attention,  # noqa: E402
    budget_trainer,  # noqa: E402
    packing,  # noqa: E402
)
from utils import IGNORE_INDEX, UserError  # noqa: E402

PAD = 0


def synth_lengths(n: int, seed: int, mean: float = 180.0, lo: int = 40, hi: int = 600) -> list[int]:
    """Alpaca-like record lengths: lognormal (sigma 0.6) with mean ``mean``, clipped to lo..hi."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.6
    z = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.exp(math.log(mean) - sigma * sigma / 2 + sigma * z)
    return x.clamp(lo, hi).long().tolist()


def data_lengths(path: str, tokenizer: str | None, n: int, max_len: int) -> list[tuple[int, int]]:
    """(prompt tokens, total tokens) of the first ``n`` records of an Alpaca JSON list."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)[:n]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    out = []
    for r in records:
        prompt = f"{r.get('instruction', '')}\n{r.get('input', '') or ''}\n### Response:"
        full = f"{prompt}{r.get('output', '')}"
        if tok is not None:
            p, t = len(tok(prompt)["input_ids"]), len(tok(full)["input_ids"]) + 1
        else:
            p, t = max(1, len(prompt) // 4), max(2, len(full) // 4 + 1)
        out.append((min(p, max_len - 1), min(t, max_len)))
    return out


class Records(torch.utils.data.Dataset):
    def __init__(self, shapes: list[tuple[int, int]], vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for p, t in shapes:
            ids = torch.randint(1, vocab, (t,), generator=g)
            lab = ids.clone()
            lab[:p] = IGNORE_INDEX
            self.items.append({"input_ids": ids, "labels": lab})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PadCollate:
    """The paper's right-padded batch; remembers (real tokens, padded tokens, attention entries)."""

    def __init__(self):
        self.log = []

    def __call__(self, items):
        lens = [len(x["input_ids"]) for x in items]
        n = max(lens)
        ids = torch.full((len(items), n), PAD, dtype=torch.long)
        lab = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(items), n), dtype=torch.long)
        for j, x in enumerate(items):
            k = lens[j]
            ids[j, :k], lab[j, :k], att[j, :k] = x["input_ids"], x["labels"], 1
        self.log.append((sum(lens), len(lens) * n, packing.packed_attention_work([[k] for k in lens], varlen=False)))
        return {"input_ids": ids, "labels": lab, "attention_mask": att}


class Profile(transformers.TrainerCallback):
    """torch.profiler over --profile_steps optimizer steps after the warm-up: GPU time per step by kind of
    kernel, and the time the GPU sat idle (wall time minus kernel time; one stream, so kernels barely overlap)."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps, self.prof, self.t0, self.summary = start, steps, None, 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            torch.cuda.synchronize()
            self.prof = gpu_profiler()
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None or self.summary is not None or state.global_step < self.start + self.steps:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.summary = summarize_profile(self.prof, wall, self.steps)


class Clock(transformers.TrainerCallback):
    def __init__(self, cuda: bool):
        self.cuda, self.ends, self.losses = cuda, [], []

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def make_model(a, attn: str, device: str):
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or int(a.hidden * 2.75),
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
        max_position_embeddings=max(2048, a.max_len), pad_token_id=PAD)
    torch.manual_seed(a.seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


@contextlib.contextmanager
def llama_patches_restored():
    """liger-kernel replaces transformers' Llama classes and functions in the module itself (not only in
    the model it is given): put them back, so a later path of this process runs without it."""
    from transformers.models.llama import modeling_llama as m

    saved = dict(vars(m))
    forwards = {k: v.__dict__.get("forward") for k, v in saved.items() if isinstance(v, type)}
    try:
        yield
    finally:
        for k in [k for k in vars(m) if k not in saved]:
            delattr(m, k)
        for k, v in saved.items():
            setattr(m, k, v)
        for k, fwd in forwards.items():
            if fwd is not None:
                saved[k].forward = fwd


def run(a, shapes, name: str, attn: str, budget_tokens: int | None, device: str, extras: frozenset = frozenset()) -> dict:
    """One path: ``extras`` holds "liger" (--use_liger_kernel: fused RMSNorm, RoPE, SwiGLU and linear
    cross-entropy) and/or "compile" (--torch_compile)."""
    cuda = device == "cuda"
    model = make_model(a, attn, device)
    if a.activation_checkpointing:
        model.gradient_checkpointing_enable()
    collate = PadCollate()
    clock = Clock(cuda)
    steps = a.warmup + a.steps
    callbacks = [clock]
    profile = Profile(a.warmup, min(a.profile_steps, a.steps)) if a.profile and cuda else None
    if profile:
        callbacks.append(profile)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.accum,
            max_steps=steps, learning_rate=2e-5, optim=a.optim, warmup_steps=0, weight_decay=0.0, seed=a.seed,
            report_to=[], dataloader_num_workers=0, use_cpu=not cuda, bf16=a.bf16, save_strategy="no",
            logging_strategy="steps", logging_steps=1, disable_tqdm=True,
            use_liger_kernel="liger" in extras, torch_compile="compile" in extras)
        kw = dict(model=model, args=args, train_dataset=Records(shapes, a.vocab, a.seed), data_collator=collate,
                  callbacks=callbacks)
        if budget_tokens is None:
            trainer = transformers.Trainer(**kw)
        else:
            budget = budget_trainer.TokenBudget.for_model(model, budget_tokens, PAD, max_row_tokens=a.max_row_tokens,
                                                   pad_to_multiple_of=a.pad_to_multiple_of)
            trainer = budget_trainer.TokenBudgetTrainer(**kw, token_budget=budget)
        trainer.remove_callback(transformers.PrinterCallback)  # the per-step log dicts
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        trainer.train()
        graphs = counters["stats"]["unique_graphs"] - graphs
    per_step = a.batch * a.accum
    timed = collate.log[a.warmup * a.accum:steps * a.accum]
    seconds = clock.ends[-1] - clock.ends[a.warmup - 1] if a.warmup else clock.ends[-1] - clock.ends[0]
    real = sum(x[0] for x in timed)
    res = {"name": name, "attn": attn, "seconds": seconds, "tokens_per_s": real / seconds, "losses": clock.losses,
           "records_per_step": per_step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "params": model.num_parameters(exclude_embeddings=True), "profile": profile.summary if profile else None,
           # what ran: liger's modules in the model (--use_liger_kernel), graphs torch.compile made (--torch_compile)
           "liger_modules": sum(type(m).__name__.startswith("Liger") for m in model.modules()),
           "compiled_graphs": graphs}
    if budget_tokens is None:
        res.update(micro_batches=a.accum, padding=1 - sum(x[0] for x in collate.log) / sum(x[1] for x in collate.log),
                   attention=sum(x[2] for x in collate.log) / steps)
    else:
        s = trainer.packing_stats
        res.update(micro_batches=s.micro_batches / s.steps, padding=1 - s.real_tokens / s.padded_tokens,
                   attention=s.attention_work / s.steps, default_attention=s.default_attention_work / s.steps,
                   varlen=trainer.token_budget.varlen)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=0, help="0: as --heads")
    ap.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden")
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--max_len", type=int, default=512, help="records are cut to this many tokens (the paper: 512)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--max_tokens", type=int, default=0, help="token budget of a packed micro-batch; 0: 8192")
    ap.add_argument("--max_row_tokens", type=int, default=None)
    ap.add_argument("--pad_to_multiple_of", type=int, default=1)
    ap.add_argument("--attn", default="sdpa", help="padded path's attention")
    ap.add_argument("--packed_attn", default="sdpa",
                    help="comma-separated attention implementations of packed runs (auto, sdpa, eager, "
                         "flex_attention, torch_varlen, flash_attention_2, ...), each optionally with +liger "
                         "(--use_liger_kernel) and/or +compile (--torch_compile), e.g. torch_varlen+liger")
    ap.add_argument("--data", default=None, help="JSON list of Alpaca records (else synthesized lengths)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for --data's lengths (else 4 characters a token)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU setting)")
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--activation_checkpointing", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path, alternating; the fastest is kept")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: torch.profiler over --profile_steps timed steps of every path; prints GPU time by "
                         "kind of kernel and idle time (the profiled steps run slower: time those without it)")
    ap.add_argument("--profile_steps", type=int, default=2)
    a = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    budget = a.max_tokens or 8192
    n = a.batch * a.accum * (a.warmup + a.steps)
    if a.data:
        shapes = data_lengths(a.data, a.tokenizer, n, a.max_len)
    else:
        shapes = [(max(1, int(0.4 * t)), t) for t in (min(x, a.max_len) for x in synth_lengths(n, a.seed))]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {torch.get_num_threads()} threads"),
          flush=True)
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads or a.heads} kv), vocab {a.vocab}; "
          f"{a.batch} x {a.accum} records per step, {a.warmup} + {a.steps} steps, records "
          f"{'from ' + a.data if a.data else 'synthesized'}: mean {sum(t for _, t in shapes) / len(shapes):.0f} tokens; "
          f"budget {budget} tokens", flush=True)
    peak = bf16_peak() if device == "cuda" else None
    paths = [("padded", a.attn, None, frozenset())]
    for spec in [x.strip() for x in a.packed_attn.split(",") if x.strip()]:
        impl, *extras = spec.split("+")
        if set(extras) - {"liger", "compile"}:
            ap.error(f"--packed_attn {spec}: the extras are +liger and +compile")
        try:
            resolved = attention.resolve_attn_implementation(impl, packing=True, device=device)
        except UserError as e:
            print(f"packed {spec}: skipped ({e})", flush=True)
            continue
        paths.append((f"packed {'+'.join([resolved, *extras])}", resolved, budget, frozenset(extras)))
    best: dict[str, dict] = {}
    for _ in range(a.repeat):  # the paths alternate; each keeps its fastest run (a shared machine is noisy)
        for name, impl, tokens, extras in paths:
            try:
                with llama_patches_restored():
                    r = run(a, shapes, name, impl, tokens, device, extras)
            except Exception as e:  # noqa: BLE001 - one implementation failing must not lose the others' figures
                print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            print(f"  {name}: {r['tokens_per_s']:.0f} tokens/s", flush=True)
            if name not in best or r["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = r
    results = [best[name] for name, *_ in paths if name in best]
    if not results or results[0]["name"] != "padded":
        raise SystemExit("the padded path failed: nothing to compare with")
    base = results[0]
    head = f"{'path':<26}{'tokens/s':>12}{'ratio':>8}{'mb/step':>9}{'padding':>9}{'attn entries':>15}{'loss diff':>11}"
    head += f"{'peak GiB':>10}{'MFU':>8}" if device == "cuda" else ""
    print(head)
    for r in results:
        diff = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["losses"], base["losses"])), default=0.0)
        line = (f"{r['name']:<26}{r['tokens_per_s']:>12.0f}{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}"
                f"{r['micro_batches']:>9.2f}{100 * r['padding']:>8.1f}%{r['attention']:>15.3g}{diff:>11.1e}")
        if device == "cuda":
            mfu = 6 * r["params"] * r["tokens_per_s"] / peak
            r["mfu"] = mfu
            line += f"{r['peak_gib']:>10.1f}{100 * mfu:>7.1f}%"
        print(line, flush=True)
    for r in results:
        if r.get("profile"):
            print_profile(r["name"], r["profile"])
    if peak:
        print(f"bf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s; N = {base['params'] / 1e9:.3f}B parameters")
    for r in results[1:]:
        if r["attention"] > r["default_attention"] * 1.0001:
            print(f"warning: {r['name']} computed more attention entries than the padded path")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "peak_flops": peak, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
