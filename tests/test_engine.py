"""The scoring engine's robustness (dump_pplxs.score_pplxs), in one process: lockstep across ranks
(two ranks as threads with an in-memory all-reduce; tests/test_fsdp2.py runs real gloo processes),
out-of-memory retries with a shrinking token budget agreed by every rank, the logits mode decided
once and never from an OOM, chunked cross-entropy, and the compute device taken from the Trainer."""

import threading
from collections import Counter

import pytest
import torch

import dump_pplxs
from small2large import batching, epoch_dumps, scoring
from small2large.dumps import load_pplxs
from small2large.losses import token_losses
from small2large.rendering import SupervisedData, tokenize_records
from small2large.scoring import score_pplxs
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import TINY_RECORDS


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS * 2, tok, 256))
    return model, tok, data, reference_pplxs(model, data.input_ids, data.labels)


class Flaky(torch.nn.Module):
    """Wraps a causal LM; raises torch.OutOfMemoryError on batches of more than ``limit`` tokens
    (on the threads in ``oom_threads``, or everywhere), or ignores ``logits_to_keep`` (a model that
    takes the argument but does not honour a mask). Counts forward calls per thread."""

    def __init__(self, inner, limit=None, oom_threads=None, ignore_mask=False, error=None, only_masked=False):
        super().__init__()
        self.inner, self.limit, self.oom_threads, self.ignore_mask = inner, limit, oom_threads, ignore_mask
        self.only_masked = only_masked  # fail only the calls with a logits_to_keep mask
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        self.calls = Counter()

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=None):
        me = threading.current_thread().name
        self.calls[me] += 1
        too_big = self.limit is not None and input_ids.numel() > self.limit
        too_big = too_big and (not self.only_masked or isinstance(logits_to_keep, torch.Tensor))
        if too_big and (self.oom_threads is None or me in self.oom_threads):
            raise self.error
        if self.ignore_mask:
            logits_to_keep = 0
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                          use_cache=use_cache)


class ThreadComm:
    """score_pplxs's collectives between threads (one per rank): OR of flags, gather of objects."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size
        self.rounds = Counter()

    def rank(self, r):
        comm = self

        class RankComm:
            def _exchange(self, value):
                comm.slots[r] = value
                comm.barrier.wait()
                out = list(comm.slots)
                comm.barrier.wait()
                return out

            def any(self, flags):
                comm.rounds[r] += 1
                return [any(f[k] for f in self._exchange(list(flags))) for k in range(len(flags))]

            def gather(self, obj):
                return self._exchange(obj)

        return RankComm()


def run_ranks(model, data, pad, world_size=2, **kw):
    """score_pplxs on ``world_size`` threads as ranks; returns [(pplxs, stats)] per rank."""
    comm, out, errors = ThreadComm(world_size), [None] * world_size, []

    def work(r):
        try:
            out[r] = score_pplxs(model, data, pad, rank=r, world_size=world_size, comm=comm.rank(r),
                                 progress=False, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, comm


def test_lockstep_unequal_shares_same_forward_calls(llama):
    model, tok, data, ref = llama
    flaky = Flaky(model)
    (r0, r1), comm = run_ranks(flaky, data, tok.pad_token_id, max_tokens=700)
    assert [r0[1].n_batches, r1[1].n_batches] == [3, 2]  # 5 batches: unequal shares...
    # ...but the same forward calls: 2 probe forwards + 3 batches on each (one dummy on rank 1)
    assert flaky.calls["rank0"] == flaky.calls["rank1"] == 5
    assert r0[1].n_forward == r1[1].n_forward == 3
    assert comm.rounds[0] == comm.rounds[1] == 5  # probe verdict + 3 steps + the final "all done"
    assert r0[0] == r1[0] and max_rel_diff(r0[0], ref) < 1e-5


def test_ranks_agree_on_the_default_budget(llama, monkeypatch):
    """The GPU default budget comes from each process's free memory, which differs: the ranks must
    still share one batch plan (the smallest budget), or records would be scored twice or never."""
    model, tok, data, ref = llama
    own = {"rank0": 1400, "rank1": 350}
    monkeypatch.setattr(scoring, "default_token_budget", lambda m, d: own[threading.current_thread().name])
    (r0, r1), _ = run_ranks(model, data, tok.pad_token_id)
    assert r0[1].max_tokens_start == r1[1].max_tokens_start == 350
    assert r0[0] == r1[0] and max_rel_diff(r0[0], ref) < 1e-5


def test_oom_halves_the_budget_and_retries(llama):
    model, tok, data, ref = llama
    flaky = Flaky(model, limit=300)
    got, stats = score_pplxs(flaky, data, tok.pad_token_id, max_tokens=2000, progress=False)
    assert max_rel_diff(got, ref) < 1e-5
    assert stats.logits == "scored"  # an OOM is never taken for "cannot take logits_to_keep"
    assert stats.max_tokens_start == 2000 and stats.max_tokens <= 300 and stats.n_oom_retries >= 3
    assert stats.max_tokens == 2000 >> stats.n_oom_retries  # halved once per retry
    # a single record that does not fit: a clear error, not a silent fallback
    longest = max(len(x) for x in data.input_ids)
    with pytest.raises(RuntimeError, match="out of memory scoring a single record"):
        score_pplxs(Flaky(model, limit=longest - 1), data, tok.pad_token_id, max_tokens=2000, progress=False)


def test_oom_on_one_rank_is_agreed_by_all(llama):
    model, tok, data, ref = llama
    flaky = Flaky(model, limit=300, oom_threads={"rank1"})
    (r0, r1), _ = run_ranks(flaky, data, tok.pad_token_id, max_tokens=1200)
    s0, s1 = r0[1], r1[1]
    assert s0.n_oom_retries == s1.n_oom_retries >= 1  # rank 0 shrinks its budget with rank 1
    assert s0.max_tokens == s1.max_tokens < 1200
    assert flaky.calls["rank0"] == flaky.calls["rank1"] and s0.n_forward == s1.n_forward  # still in lockstep
    assert r0[0] == r1[0] and max_rel_diff(r0[0], ref) < 1e-5
    with pytest.raises(RuntimeError, match="single record"):  # the other rank stops too, no hang
        lengths = [len(x) for x in data.input_ids]
        longest_of_rank1 = lengths[batching.length_sorted_batches(lengths, 1200)[1][0]]
        run_ranks(Flaky(model, limit=longest_of_rank1 - 1, oom_threads={"rank1"}), data, tok.pad_token_id,
                  max_tokens=1200)


def test_logits_mode_decided_once_never_from_oom(llama, recwarn):
    model, tok, data, ref = llama
    # a model that takes logits_to_keep but does not honour the mask: full logits, decided by the probe
    got, stats = score_pplxs(Flaky(model, ignore_mask=True), data, tok.pad_token_id, max_tokens=500, progress=False)
    assert stats.logits == "all" and max_rel_diff(got, ref) < 1e-5
    assert any("scoring with full logits" in str(w.message) for w in recwarn.list)
    # an OOM in the probe is an error, not answered with full logits (which take far more memory)
    with pytest.raises(RuntimeError, match="out of memory scoring a single record"):
        score_pplxs(Flaky(model, limit=1), data, tok.pad_token_id, progress=False)
    # any other error in a batch is raised too (the old code switched to full logits on RuntimeError)
    boom = Flaky(model, limit=300, error=RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
    with pytest.raises(RuntimeError, match="CUBLAS"):
        score_pplxs(boom, data, tok.pad_token_id, max_tokens=2000, progress=False)
    # a rank whose probe fails makes every rank use full logits
    (r0, r1), _ = run_ranks(Flaky(model, limit=1, oom_threads={"rank1"}, error=TypeError("no mask"),
                                  only_masked=True),
                            data, tok.pad_token_id, max_tokens=700)
    assert r0[1].logits == r1[1].logits == "all" and max_rel_diff(r0[0], ref) < 1e-5


def test_chunked_cross_entropy_equals_unchunked(llama):
    model, tok, data, ref = llama
    torch.manual_seed(0)
    logits, tgt = torch.randn(3, 7, 50) * 4, torch.randint(0, 50, (21,))
    pos = torch.arange(21)
    full = torch.nn.functional.cross_entropy(logits.reshape(21, 50), tgt, reduction="none")
    for chunk in (1, 50, 150, 51, 10**9):  # one position per chunk ... everything at once
        assert torch.equal(token_losses(logits, pos, tgt, chunk_elements=chunk), full), chunk
    perm = torch.randperm(21)  # scattered rows (full-logits mode reads the scored rows in place)
    assert torch.equal(token_losses(logits, perm, tgt[perm], chunk_elements=100), full[perm])
    vocab = model.config.vocab_size
    for mode in ("scored", "all"):
        small, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=700, logits=mode, progress=False,
                               chunk_elements=3 * vocab)
        assert max_rel_diff(small, ref) < 1e-5, mode


def test_device_comes_from_the_trainer_not_the_first_parameter(llama, tmp_path):
    """Under FSDP/DeepSpeed CPU offload the first parameter sits on the CPU while the model computes on
    the GPU. Here: a first parameter on the meta device; the callback must use the Trainer's device."""
    from types import SimpleNamespace

    model, tok, data, ref = llama
    holder = torch.nn.Module()
    holder.offloaded = torch.nn.Parameter(torch.empty(3, device="meta"))
    holder.module = model  # the wrapper the Trainer would run (its first parameter: meta)
    holder.forward = model.forward
    assert next(holder.parameters()).device.type == "meta"
    trainer = SimpleNamespace(model_wrapped=holder, model=model, args=SimpleNamespace(device=torch.device("cpu")),
                              accelerator=SimpleNamespace(autocast=None))
    args = dump_pplxs.DumpArguments(dump_dir=str(tmp_path))
    cb = epoch_dumps.PerplexityDumpCallback(data, tok.pad_token_id, args).attach(trainer)
    cb.dump("pre")
    got = list(load_pplxs(tmp_path / "epoch-pre.pkl"))
    assert max_rel_diff(got, ref) < 1e-5 and cb.last_stats.max_tokens == scoring.CPU_TOKEN_BUDGET


def test_auto_budget_depends_on_vocabulary_and_memory():
    f = scoring.auto_token_budget
    # hand-computed: per token 4 x 32000 + 4 x (6 x 4096 + 3 x 16384) = 422912 bytes; half of 40 GiB less
    # three 64 MiB cross-entropy chunks is 21374173184 bytes -> 50540 tokens -> 50432 (multiple of 256)
    assert f(40 * 2**30, 32000, 4096) == 50432
    assert f(40 * 2**30, 128256, 4096) < 0.55 * f(40 * 2**30, 32000, 4096)  # a 128K vocabulary: about half
    assert f(80 * 2**30, 128256, 4096) > 1.9 * f(40 * 2**30, 128256, 4096)
    assert f(0, 128256, 4096) == 1024 and f(10**15, 1000, 64) == 131072
