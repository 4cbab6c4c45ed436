"""small2large/packing.py: token-budget micro-batches train exactly as the padded path (same gradients
and weights, fewer forward calls; one process and two under torchrun), packed scoring equals the
one-record-at-a-time reference, rows stay capped, padding stays low, errors are one line."""

import doctest
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from small2large import attention, packing
from small2large.attention import resolve_attn_implementation
from small2large.budget_trainer import TokenBudget, TokenBudgetTrainer
from small2large.packing import (
    batch_records,
    pack_rows,
    packed_attention_work,
    packed_record_losses,
    plan_micro_batches,
    plan_scoring_batches,
    plan_tokens,
)
from utils import IGNORE_INDEX, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 0
PROMPT = 3  # the first labels of every record are IGNORE_INDEX, like an instruction prompt
# AdamW's first step is lr * g / (|g| + eps): with the default eps 1e-8, entries whose gradient is ~eps
# (a random tiny model has some, e.g. 4.9e-9) turn float32 rounding of g (1e-11 here) into weight
# differences of ~1e-6, 1.3e-5 of the largest weight. The gradients are compared directly at 1e-5;
# eps 1e-6 keeps the weight comparison about the gradients rather than about that amplification.
ADAM_EPS = 1e-6


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    yield


def tiny_model(arch: str, attn: str = "sdpa"):
    """A random float32 Llama-like or Qwen2-like model (tied embeddings), seed 0, no download."""
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def random_records(n: int, seed: int, lo: int = 5, hi: int = 60) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(1, 300, (m,), generator=g).tolist()
        out.append((ids, [IGNORE_INDEX] * PROMPT + ids[PROMPT:]))
    return out


class Records(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        ids, lab = self.records[i]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(lab)}


def pad_collate(items):
    """The paper's right-padded batch (as utils.pad_batch): mask from the true lengths."""
    n = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), n), PAD, dtype=torch.long)
    lab = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for j, x in enumerate(items):
        k = len(x["input_ids"])
        ids[j, :k], lab[j, :k], att[j, :k] = x["input_ids"], x["labels"], 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


class GradCapture(transformers.TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def train(arch, tmp_path, budget=None, steps=1, n_records=24, loss_kwargs=True, attn="sdpa", optim="adamw_torch"):
    """(gradients per step, final weights, forward calls, packing stats) of a real Trainer run at
    4 records x 3 accumulation steps; budget None: transformers.Trainer, the default padded path."""
    model = tiny_model(arch, attn)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{arch}-{budget}"), per_device_train_batch_size=4,
        gradient_accumulation_steps=3, max_steps=steps, num_train_epochs=1, learning_rate=1e-3, optim=optim,
        warmup_steps=0,
        weight_decay=0.0, adam_epsilon=ADAM_EPS, seed=0, report_to=[], dataloader_num_workers=0, use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True)
    cap = GradCapture()
    kw = dict(model=model, args=args, train_dataset=Records(random_records(n_records, 1)), data_collator=pad_collate,
              callbacks=[cap])
    if budget is None:
        trainer = transformers.Trainer(**kw)
    else:
        trainer = TokenBudgetTrainer(**kw, token_budget=budget)
    if not loss_kwargs:  # a model whose loss takes no num_items_in_batch: per-micro-batch means
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return cap.grads, weights, len(calls), getattr(trainer, "packing_stats", None)


def assert_close(got: dict, want: dict, rtol=1e-5):
    assert got.keys() == want.keys()
    for n in want:
        scale = float(want[n].abs().max()) or 1.0
        err = float((got[n] - want[n]).abs().max()) / scale
        assert err <= rtol, f"{n}: relative difference {err:.2e}"


# ----------------------------------------------------------------------------------------
# Training: same gradients and weights as the padded path, fewer micro-batches


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_budget_step_equals_padded_step(arch, tmp_path):
    want_g, want_w, want_calls, _ = train(arch, tmp_path)
    budget = TokenBudget(max_tokens=320, pad_token_id=PAD)
    got_g, got_w, got_calls, stats = train(arch, tmp_path, budget)
    assert want_calls == 3 and got_calls < want_calls  # really regrouped: fewer forward calls
    assert stats.micro_batches == got_calls and stats.records == 12
    assert stats.padded_tokens < stats.default_padded_tokens
    assert len(got_g) == len(want_g) == 1
    assert_close(got_g[0], want_g[0])
    assert_close(got_w, want_w)


def test_records_longer_than_the_budget_and_more_micro_batches_than_steps(tmp_path):
    """Every record above the budget runs alone: more micro-batches than accumulation steps, two
    optimizer steps, still the padded path's gradients and weights."""
    want_g, want_w, _, _ = train("llama", tmp_path, steps=2)
    got_g, got_w, calls, stats = train("llama", tmp_path, TokenBudget(max_tokens=30, pad_token_id=PAD), steps=2)
    assert calls > 6 and stats.history[0][0] == 3 and stats.history[0][2] > 3
    for g, w in zip(got_g, want_g):
        assert_close(g, w)
    assert_close(got_w, want_w)


def test_loss_without_num_items_in_batch(tmp_path):
    """A model whose loss takes no loss kwargs: the default loss is each micro-batch's mean / 3; the
    packed path weights every token by its original micro-batch and matches it."""
    want_g, want_w, _, _ = train("qwen2", tmp_path, loss_kwargs=False)
    got_g, got_w, calls, _ = train("qwen2", tmp_path, TokenBudget(max_tokens=320, pad_token_id=PAD), loss_kwargs=False)
    assert calls < 3
    assert_close(got_g[0], want_g[0])
    assert_close(got_w, want_w)


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_last_partial_step_of_an_epoch(loss_kwargs, tmp_path):
    """One epoch of 22 records (micro-batches of 4, 4, 4, 4, 4, 2 records: two steps of 3, the last
    micro-batch short) and of 14 (steps of 3 and 1 micro-batches: in the partial step the Trainer
    divides a per-micro-batch mean loss by 1, not 3): same gradients and weights as the padded path."""
    for n in (22, 14):
        want_g, want_w, _, _ = train("llama", tmp_path / f"a{n}", steps=-1, n_records=n, loss_kwargs=loss_kwargs)
        got_g, got_w, _, stats = train("llama", tmp_path / f"b{n}", TokenBudget(max_tokens=320, pad_token_id=PAD),
                                       steps=-1, n_records=n, loss_kwargs=loss_kwargs)
        assert len(want_g) == len(got_g) == 2 and [h[0] for h in stats.history] == [3, 3 if n == 22 else 1]
        for g, w in zip(got_g, want_g):
            assert_close(g, w)
        assert_close(got_w, want_w)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn, document by document with sdpa (the real one runs on CUDA only)."""
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=tuple(window_size) == (-1, 0), scale=scale,
                                           enable_gqa=enable_gqa)
        out[a:b] = o[0].transpose(0, 1)
    return out


def reference_varlen_torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                                window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature: scale and window_size, no grouped-query attention."""
    assert q.shape[1] == k.shape[1] == v.shape[1] and return_aux is None
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


def reference_varlen_torch_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's varlen_attn signature: is_causal only."""
    assert q.shape[1] == k.shape[1] == v.shape[1] and return_aux is None
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.mark.parametrize("kernel", [reference_varlen, reference_varlen_torch_2_11, reference_varlen_torch_2_10])
def test_torch_varlen_plumbing(monkeypatch, tmp_path, kernel):
    """The torch_varlen attention (registered with transformers) with the kernel replaced by a
    per-document reference: packed rows, padded batches (2D mask) and a varlen training step match sdpa."""
    monkeypatch.setattr(attention, "_varlen_kernel", kernel)
    attention.register_torch_varlen()
    recs = random_records(5, 3)
    model = tiny_model("llama").eval()
    plan = [[[0, 1], [2]], [[3, 4]]]
    with torch.no_grad():
        for mb in plan:
            b = pack_rows(recs, mb, PAD)
            inputs = b.model_inputs(varlen=True)
            inputs.pop("labels")
            want = model(**inputs).logits
            model.set_attn_implementation("torch_varlen")
            got = model(**inputs).logits
            inputs.pop("cu_seq_lens_q"), inputs.pop("cu_seq_lens_k")  # documents from the position ids
            got_pos = model(**inputs).logits
            model.set_attn_implementation("sdpa")
            keep = b.record_index >= 0
            assert float((got - want)[keep].abs().max()) < 1e-5
            assert float((got_pos - want)[keep].abs().max()) < 1e-5
        padded = pad_collate([Records(recs)[i] for i in range(5)])
        padded.pop("labels")
        want = model(**padded).logits
        model.set_attn_implementation("torch_varlen")
        got = model(**padded).logits
        keep = padded["attention_mask"].bool()
        assert float((got - want)[keep].abs().max()) < 1e-5
    want_g, want_w, _, _ = train("llama", tmp_path)
    got_g, got_w, calls, _ = train("llama", tmp_path, TokenBudget(300, PAD, varlen=True), attn="torch_varlen")
    assert calls < 3
    assert_close(got_g[0], want_g[0])
    assert_close(got_w, want_w)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_torchrun(tmp_path):
    """2 CPU processes (gloo), 2 optimizer steps of 2 x 4 x 3 records: the token-budget path (one
    budget where processes need different micro-batch counts, one below the longest record) ends at the
    weights of the padded path under the same 2-process run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           os.path.join(ROOT, "tests", "_packing_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    want = torch.load(tmp_path / "default.pt")
    assert torch.load(tmp_path / "budget256.pt")["uneven"]  # split_plan evened out the processes' counts
    for name in ("budget256", "budget40"):
        got = torch.load(tmp_path / f"{name}.pt")
        assert got["calls"] < want["calls"] if name == "budget256" else got["calls"] > want["calls"]
        assert_close(got["weights"], want["weights"])
        assert got["global_step"] == want["global_step"] == 2


# ----------------------------------------------------------------------------------------
# Packed scoring: the one-record reference


def reference_losses(model, recs):
    """Each record alone through the model: mean loss over its scored tokens (nonzero denominator)."""
    out = []
    with torch.no_grad():
        for ids, lab in recs:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            lab = torch.tensor(lab)
            keep = lab[1:] != IGNORE_INDEX
            ce = F.cross_entropy(logits[:-1][keep], lab[1:][keep], reduction="none")
            out.append(float(ce.sum() / (ce != 0).sum()) if keep.any() else 0.0)
    return np.array(out)


def packed_losses(model, recs, max_tokens, max_row_tokens=None, scored_only=False):
    lengths = [len(ids) for ids, _ in recs]
    plan = plan_scoring_batches(lengths, max_tokens, max_row_tokens)
    out = np.full(len(recs), np.nan)
    with torch.no_grad():
        for mb in plan:
            b = pack_rows(recs, mb, PAD)
            inputs = b.model_inputs()
            inputs.pop("labels")
            logits = model(**inputs).logits
            if scored_only:
                logits = logits[b.scored_positions()]
            out[b.order] = packed_record_losses(logits, b).numpy()
    return out, plan


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")])
def test_packed_scoring_equals_one_record_reference(arch, attn):
    model = tiny_model(arch, attn).eval()
    recs = random_records(30, 2) + [(list(range(1, 90)), [IGNORE_INDEX] * 10 + list(range(11, 90)))]
    recs.append(([5, 6, 7], [IGNORE_INDEX] * 3))  # nothing scored: loss 0, perplexity 1
    want = reference_losses(model, recs)
    for max_tokens, row in [(128, 64), (256, None), (60, None)]:  # 89 tokens > 60: a record above the budget
        got, plan = packed_losses(model, recs, max_tokens, row, scored_only=max_tokens == 256)
        assert any(len(mb) > 1 for mb in plan) or max_tokens == 60
        np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=0)
    assert got[-1] == 0.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_packed_scoring_flex_attention():
    """FlexAttention builds a BlockMask from the packed position ids (torch.compile: 20-40 s on a CPU).
    The reference is the same weights under sdpa: on the CPU, torch 2.13's flex_attention computes
    wrong logits for a lone sequence of exactly 8 tokens (head_dim 8 here), which one record has."""
    model = tiny_model("llama", "flex_attention").eval()
    recs = random_records(12, 4)
    got, plan = packed_losses(model, recs, 128, 64)
    assert any(len(mb) > 1 for mb in plan)
    want = reference_losses(tiny_model("llama", "sdpa").eval(), recs)
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=0)


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    """Alpaca-like record lengths: lognormal around 180 tokens, within 40..600."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(180) - 0.18, 0.6, n), 40, 600).astype(int).tolist()


@pytest.mark.parametrize("max_row_tokens", [512, 1024, None])
def test_scoring_padding_at_most_two_percent(max_row_tokens):
    lengths = realistic_lengths(5000)
    for max_tokens in (300, 512, 1000, 1536, 4096, 16384, 65536):
        plan = plan_scoring_batches(lengths, max_tokens, max_row_tokens)
        assert sorted(i for mb in plan for r in mb for i in r) == list(range(len(lengths)))
        processed, real = plan_tokens(lengths, plan)
        assert real == sum(lengths)
        assert 1 - real / processed <= 0.02, (max_tokens, 1 - real / processed)
        for mb in plan:  # every micro-batch within the budget, unless it is one record above it
            size = len(mb) * max(sum(lengths[i] for i in r) for r in mb)
            assert size <= max_tokens or (len(mb) == 1 and len(mb[0]) == 1)
    varlen = plan_scoring_batches(lengths, 4096, varlen=True)
    assert plan_tokens(lengths, varlen)[0] == sum(lengths) and all(len(mb) == 1 for mb in varlen)


def test_rows_capped_and_attention_work():
    lengths = realistic_lengths(32, seed=1) + [700]  # one outlier: the default cap must not follow it blindly
    padded = sum(packed_attention_work([[n] for n in lengths[j:j + 4]], varlen=False) for j in range(0, 33, 4))
    for max_tokens, cap in [(2048, 512), (4096, None), (16384, 300), (1000, None)]:
        plan = plan_micro_batches(lengths, max_tokens, cap, max_attention_work=padded)
        limit = packing.row_capacity(max_tokens, cap or max(lengths))
        assert sorted(i for mb in plan for r in mb for i in r) == list(range(len(lengths)))
        for mb in plan:
            for r in mb:
                assert len(r) == 1 or sum(lengths[i] for i in r) <= limit  # only a lone record exceeds the cap
        packed = sum(packed_attention_work([[lengths[i] for i in r] for r in mb], varlen=False) for mb in plan)
        varlen = sum(packed_attention_work([[lengths[i] for i in r] for r in mb], varlen=True)
                     for mb in plan_micro_batches(lengths, max_tokens, varlen=True))
        assert varlen < packed <= padded, (max_tokens, cap)
    # hand-computed: one row of 3 + 2 tokens and one of 4
    assert packed_attention_work([[3, 2], [4]], varlen=True) == 6 + 3 + 10
    assert packed_attention_work([[3, 2], [4]], varlen=False) == 2 * 5 * 5
    assert packed_attention_work([[5], [2], [3]], varlen=False) == 3 * 5 * 5  # a padded batch


def test_pack_rows_and_batch_records_round_trip():
    recs = random_records(7, 5)
    b = pack_rows(recs, [[0, 1, 2], [3], [4, 5, 6]], PAD, pad_to_multiple_of=8)
    assert b.input_ids.shape[1] % 8 == 0 and b.real_tokens == sum(len(r[0]) for r in recs)
    for k, i in enumerate(b.order):  # every record intact, first label ignored, positions from 0
        where = b.record_index == k
        ids, lab = recs[i]
        assert b.input_ids[where].tolist() == ids
        assert b.labels[where].tolist() == [IGNORE_INDEX] + lab[1:]
        assert b.position_ids[where].tolist() == list(range(len(ids)))
    assert (b.labels[b.record_index < 0] == IGNORE_INDEX).all()
    padded = pad_collate([Records(recs)[i] for i in range(7)])
    assert [(x.tolist(), y.tolist()) for x, y in batch_records(padded)] == [(list(x), list(y)) for x, y in recs]
    one = pack_rows(recs, [[0, 1]], PAD).model_inputs()
    got = batch_records(one)
    assert [x.tolist() for x, _ in got] == [recs[0][0], recs[1][0]]


# ----------------------------------------------------------------------------------------
# Flags and implementations: one-line errors


def test_one_line_errors():
    cases = [
        lambda: TokenBudget(max_tokens=0, pad_token_id=PAD),
        lambda: TokenBudget(max_tokens=512, pad_token_id=PAD, max_row_tokens=0),
        lambda: resolve_attn_implementation("flash_attention_2", packing=True, device="cpu"),
        lambda: resolve_attn_implementation("flash_attention_5", packing=True, device="cpu"),
        lambda: resolve_attn_implementation("torch_varlen", packing=True, device="cpu"),
        lambda: resolve_attn_implementation("paged|sdpa", packing=True, device="cpu"),
        lambda: resolve_attn_implementation("nonsense", packing=False, device="cpu"),
        lambda: batch_records({"input_ids": torch.zeros(1, 3, dtype=torch.long),
                               "labels": torch.zeros(1, 3, dtype=torch.long),
                               "attention_mask": torch.tensor([[0, 1, 1]])}),  # left padding
    ]
    for case in cases:
        with pytest.raises(UserError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value)
    if not (transformers.utils.is_flash_attn_2_available() or transformers.utils.is_kernels_available()):
        with pytest.raises(UserError, match="flash-attn"):
            resolve_attn_implementation("flash_attention_2", packing=True, device="cuda")
    assert resolve_attn_implementation(None, packing=True, device="cpu") == "sdpa"
    assert resolve_attn_implementation("eager", packing=True, device="cpu") == "eager"


def test_doctests():
    assert doctest.testmod(packing).failed == 0


@pytest.mark.gpu
def test_torch_varlen_on_cuda_matches_sdpa():
    """The real torch varlen kernel (bf16 autocast, head_dim 64, GQA) on packed rows: logits and
    gradients as sdpa's on the same rows (bf16 tolerance), and the padded-batch (2D mask) path too."""
    attention.register_torch_varlen()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda")
    recs = random_records(16, 6, lo=20, hi=300)
    b = pack_rows(recs, [list(range(16))], PAD, device="cuda")
    results = {}
    for impl in ("sdpa", "torch_varlen"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**b.model_inputs(varlen=impl == "torch_varlen"))
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        results[impl] = (out.logits.float().detach(), float(out.loss), grads)
    (want, want_loss, want_g), (got, got_loss, got_g) = results["sdpa"], results["torch_varlen"]
    assert float((got - want).abs().max()) <= 3e-2 * max(1.0, float(want.abs().max()))
    assert abs(got_loss - want_loss) <= 1e-2 * abs(want_loss)
    for n in want_g:
        assert float((got_g[n] - want_g[n]).abs().max()) <= 5e-2 * float(want_g[n].abs().max()) + 1e-6, n
    padded = {k: v.cuda() for k, v in pad_collate([Records(recs)[i] for i in range(16)]).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.set_attn_implementation("sdpa")
        want = model(**padded).logits.float()
        model.set_attn_implementation("torch_varlen")
        got = model(**padded).logits.float()
    keep = padded["attention_mask"].bool()
    assert float((got - want)[keep].abs().max()) <= 3e-2 * max(1.0, float(want[keep].abs().max()))
