"""The perplexity scoring engine of dump_pplxs.py (no training, no train.py needed): exactness
against an independent per-record reference loop, invariances, the pure maths."""

import math
import random

import pytest
import torch

from small2large.batching import length_sorted_batches, padding_share, shard_batches
from small2large.losses import record_losses
from small2large.rendering import SupervisedData, tokenize_records
from small2large.scoring import per_sample_loss, score_pplxs
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import TINY_RECORDS
from utils import IGNORE_INDEX


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


# ---------------------------------------------------------------- pure maths, hand-computed


def test_per_sample_loss_both_denominators_hand_computed():
    # record 0: scored tokens with losses ln2 (equal logits), 0 (logit gap 200), ln(1+e^-1) (gap 1)
    # record 1: fully masked
    v = torch.tensor
    logits = v([[[0.0, 0.0], [0.0, 200.0], [0.0, 1.0], [5.0, 5.0]],
                [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = v([[IGNORE_INDEX, 0, 1, 1], [IGNORE_INDEX] * 4])
    l1 = math.log(1 + math.exp(-1))
    nonzero = per_sample_loss(logits, labels, "nonzero")
    mean = per_sample_loss(logits, labels, "mean")
    assert nonzero[0].item() == pytest.approx((math.log(2) + l1) / 2, rel=1e-6)
    assert mean[0].item() == pytest.approx((math.log(2) + l1) / 3, rel=1e-6)
    assert nonzero[1].item() == 0.0 and mean[1].item() == 0.0  # fully truncated -> perplexity exp(0) = 1.0


def test_record_losses_counts_per_row():
    tl = torch.tensor([1.0, 0.0, 3.0, 0.0])
    row = torch.tensor([0, 0, 2, 2])
    assert record_losses(tl, row, 3, "nonzero").tolist() == [1.0, 0.0, 3.0]
    assert record_losses(tl, row, 3, "mean").tolist() == [0.5, 0.0, 1.5]
    with pytest.raises(ValueError):
        record_losses(tl, row, 3, "median")


def test_length_sorted_batches_budget_and_cover():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    batches = length_sorted_batches(lengths, 500)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(300))  # every record exactly once
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 500 or len(b) == 1
        assert lengths[b[0]] == max(lengths[i] for i in b)
    processed, real = padding_share(lengths, batches)
    assert real == sum(lengths) and 1 - real / processed < 0.05
    assert length_sorted_batches([600, 10], 500) == [[0], [1]]  # too long for the budget: alone


def test_shard_batches_cover():
    for n in range(0, 9):
        for ws in (1, 2, 3):
            shards = [shard_batches(n, r, ws) for r in range(ws)]
            assert sorted(b for s in shards for b in s) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---------------------------------------------------------------- engine vs reference


def _data(tok, records=TINY_RECORDS, max_len=256):
    return SupervisedData(*tokenize_records(records, tok, max_len))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_engine_equals_reference_loop(arch, request):
    model, tok = load(request.getfixturevalue(f"tiny_{arch}"))
    data = _data(tok)
    for den in ("nonzero", "mean"):
        ref = reference_pplxs(model, data.input_ids, data.labels, den)
        for mode in ("scored", "all"):
            got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=300, denominator=den,
                                     logits=mode, progress=False)
            assert stats.logits == mode and stats.n_batches > 1
            assert max_rel_diff(got, ref) < 1e-5, (arch, den, mode)
    assert all(p > 1.5 for p in ref)  # a random model: real perplexities, not the truncation value


def test_invariance_budget_order_and_train_mode_restored(tiny_llama):
    model, tok = load(tiny_llama)
    records = TINY_RECORDS * 3
    data = _data(tok, records)
    base, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=1, progress=False)  # one record per batch
    model.train()
    for budget in (64, 500, 100000):
        got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=budget, progress=False)
        assert max_rel_diff(got, base) < 1e-5, budget
        assert model.training  # train mode restored after scoring
    perm = list(range(len(records)))
    random.Random(1).shuffle(perm)
    shuffled = _data(tok, [records[i] for i in perm])
    got, _ = score_pplxs(model, shuffled, tok.pad_token_id, max_tokens=500, progress=False)
    assert max_rel_diff(got, [base[i] for i in perm]) < 1e-5


def test_fully_truncated_record_gets_one(tiny_llama):
    model, tok = load(tiny_llama)
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "answer"}
    data = _data(tok, [TINY_RECORDS[0], long_prompt, TINY_RECORDS[1]], max_len=200)
    assert all(t == IGNORE_INDEX for t in data.labels[1]) and data.n_fully_truncated == 1
    got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=200, progress=False)
    assert got[1] == 1.0 and stats.n_fully_truncated == 1
    ref = reference_pplxs(model, data.input_ids, data.labels)
    assert max_rel_diff(got, ref) < 1e-5


def test_train_mode_model_with_dropout_is_scored_in_eval_mode(tiny_opt):
    """The Trainer hands over its model in train mode; OPT has dropout (0.1), so scoring must switch it off:
    two scorings of a train-mode model are identical and equal the eval-mode one-record reference, and
    train mode is restored afterwards."""
    model, tok = load(tiny_opt)
    assert model.config.dropout > 0
    data = _data(tok)
    ref = reference_pplxs(model, data.input_ids, data.labels)   # load() put the model in eval mode
    model.train()
    with torch.no_grad():   # dropout is live in train mode: the same forward twice differs
        ids = torch.tensor([data.input_ids[3]])
        assert not torch.equal(model(ids).logits, model(ids).logits)
    first, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=300, progress=False)
    assert model.training   # train mode restored
    second, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=300, progress=False)
    assert first == second, "two scorings of the same train-mode model differ: dropout was active while scoring"
    err = max_rel_diff(first, ref)
    assert err < 1e-5, f"scoring a train-mode model differs from the eval-mode reference by {err:.2g} (dropout on?)"


def test_losses_doctests():
    import doctest

    from small2large import losses

    result = doctest.testmod(losses)
    assert result.failed == 0 and result.attempted >= 6
