"""score_pplxs(packed=True) / dump_pplxs.py --pplx_packing: records packed into rows under the token budget
give each record's perplexity as scoring it alone does (float32, 1e-5), with at most 2% padding, through the
same engine: both logits modes, both denominators, two ranks in lockstep, and the out-of-memory back-off."""

import json
import os
from collections import Counter

import pytest
import torch

import dump_pplxs
from small2large import attention
from small2large.rendering import SupervisedData, tokenize_records
from small2large.scoring import score_pplxs
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import ROOT, TINY_RECORDS
from tests.test_engine import run_ranks
from tests.test_packing import reference_varlen
from utils import safe_load_pickle

_one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS * 2, tok, 256))
    return model, tok, data


@pytest.fixture(scope="module")
def sample(tiny_llama):
    """400 records of the shipped sample data, tokenized with the tiny model's tokenizer."""
    model, tok = load(tiny_llama)
    with open(os.path.join(ROOT, "data", "sample_train.json"), encoding="utf-8") as f:
        records = json.load(f)[:400]
    return model, tok, SupervisedData(*tokenize_records(records, tok, 256))


class Counting(torch.nn.Module):
    """Wraps a causal LM: counts forward calls per thread, and raises an out-of-memory error on inputs of
    more than ``limit`` tokens."""

    def __init__(self, inner, limit=None):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, Counter()
        self.config = inner.config

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        import threading

        self.calls[threading.current_thread().name] += 1
        if self.limit is not None and input_ids.numel() > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)


@pytest.mark.parametrize("logits", ["scored", "all"])
@pytest.mark.parametrize("denominator", ["nonzero", "mean"])
def test_packed_equals_one_record_scoring(llama, logits, denominator):
    model, tok, data = llama
    ref = reference_pplxs(model, data.input_ids, data.labels, denominator)
    for budget in (64, 300, 4096):   # 64: below the longest record, which then gets a row of its own
        got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=budget, denominator=denominator,
                                 logits=logits, progress=False, packed=True)
        assert max_rel_diff(got, ref) < 1e-5, budget
        assert stats.logits == logits and stats.n_records == len(data)
        padded, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=budget, denominator=denominator,
                                logits=logits, progress=False)
        assert max_rel_diff(got, padded) < 1e-5


def test_padding_stays_under_2_percent_at_any_budget(sample, monkeypatch):
    """With a varlen attention a micro-batch is one row: no padding at any budget. torch's varlen kernel runs on
    CUDA only, so here it is replaced by a per-record sdpa reference (as in tests/test_packing.py)."""
    model, tok, data = sample
    monkeypatch.setattr(attention, "_varlen_kernel", reference_varlen)
    attention.register_torch_varlen()
    longest = max(len(x) for x in data.input_ids)
    ref, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=4096, progress=False)
    try:
        for budget in (longest, 1024, 4096, 32768):
            dense, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=budget, progress=False, packed=True)
            model.set_attn_implementation("torch_varlen")
            got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=budget, progress=False, packed=True)
            model.set_attn_implementation("sdpa")
            assert stats.padding_share <= 0.02 and stats.processed_tokens == stats.real_tokens, budget
            assert max_rel_diff(dense, ref) < 1e-5, budget   # sdpa on packed rows (a dense document mask)
            assert max_rel_diff(got, ref) < 1e-5, budget
    finally:
        model.set_attn_implementation("sdpa")


def test_two_ranks_in_lockstep_and_the_oom_back_off(llama):
    model, tok, data = llama
    ref = reference_pplxs(model, data.input_ids, data.labels)
    counting = Counting(model)
    (r0, r1), _ = run_ranks(counting, data, tok.pad_token_id, max_tokens=200, packed=True)
    assert r0[0] == r1[0] and max_rel_diff(r0[0], ref) < 1e-5
    assert counting.calls["rank0"] == counting.calls["rank1"] and r0[1].n_forward == r1[1].n_forward
    assert r0[1].n_records + r1[1].n_records == len(data)
    limit = max(len(x) for x in data.input_ids)   # every record fits alone; full packed rows do not
    flaky = Counting(model, limit=limit)
    got, stats = score_pplxs(flaky, data, tok.pad_token_id, max_tokens=1200, progress=False, packed=True)
    assert max_rel_diff(got, ref) < 1e-5
    assert stats.n_oom_retries >= 1 and stats.max_tokens == 1200 >> stats.n_oom_retries
    with pytest.raises(RuntimeError, match="out of memory scoring a single record"):
        score_pplxs(Counting(model, limit=limit - 1), data, tok.pad_token_id, max_tokens=1200, progress=False,
                    packed=True)


def test_dump_pplxs_pplx_packing_gives_the_same_dumps(tiny_llama, tiny_dataset, tmp_path):
    dumps = {}
    for name, extra in (("plain", ()), ("packed", ("--pplx_packing", "True"))):
        d = tmp_path / name
        dump_pplxs.main(["--model_name_or_path", tiny_llama, "--data_path", tiny_dataset, "--output_dir", str(d / "out"),
                         "--dump_dir", str(d / "dumps"), "--num_train_epochs", "1", "--per_device_train_batch_size",
                         "4", "--learning_rate", "1e-2", "--seed", "42", "--report_to", "none", "--disable_tqdm",
                         "True", "--save_strategy", "no", "--pplx_max_tokens", "200", *extra])
        dumps[name] = [safe_load_pickle(str(d / "dumps" / f)) for f in ("epoch-pre.pkl", "epoch-1.pkl")]
    for plain, packed in zip(dumps["plain"], dumps["packed"]):
        assert max_rel_diff(packed, plain) < 1e-5
    assert dumps["plain"][0] != dumps["plain"][1]   # the epoch moved them: two different comparisons


class PositionsOnly(Counting):
    """A forward that takes logits_to_keep only as an int or 1-D positions, as liger-kernel's Llama forward
    (--use_liger_kernel): a [rows, T] boolean mask raises the IndexError that forward raises."""

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim != 1:
            raise IndexError("too many indices for tensor of dimension 3")
        return super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)


def test_varlen_scoring_passes_positions_that_a_liger_forward_takes(llama, monkeypatch):
    """Packed varlen scoring (one row per batch) passes the scored positions as a 1-D index, built on the
    CPU with the targets and copied with the batch; the logits-mode probe tries that same form. So a forward
    that cannot take a boolean mask (liger-kernel's) still projects only the scored positions, and the
    perplexities equal the one-record reference. Without varlen (several rows, a boolean mask) the probe
    falls back to full logits, with the reason."""
    from small2large import scoring

    model, tok, data = llama
    ref = reference_pplxs(model, data.input_ids, data.labels)
    wrapped = PositionsOnly(model)
    probe = scoring._collate(data.input_ids, data.labels, [0], tok.pad_token_id, "cpu")
    mode, reason = scoring.decide_logits_mode(wrapped, probe, "scored")
    assert mode == "all" and "IndexError" in reason
    assert scoring.decide_logits_mode(wrapped, probe, "scored", index=True) == ("scored", "")
    # torch_varlen runs on CUDA only: here sdpa takes the one packed row (its dense document mask), the varlen
    # kwargs (cu_seq_lens_*) ride along unused, and everything else is the varlen path
    monkeypatch.setattr(scoring, "is_varlen", lambda impl: True)
    for budget in (300, 4096):
        got, stats = score_pplxs(wrapped, data, tok.pad_token_id, max_tokens=budget, progress=False, packed=True)
        assert stats.logits == "scored" and stats.padding_share == 0.0
        assert max_rel_diff(got, ref) < 1e-5, budget
