"""The perplexity engine (step 2, and evaluate.py's gold perplexity): every record's response
perplexity in length-sorted, token-budget batches, with logits only at the scored positions, chunked
cross-entropy, out-of-memory back-off, and every process in lockstep under torchrun."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import warnings
from dataclasses import dataclass

import torch

from small2large.attention import implementation_of, is_varlen, unwrap_model
from small2large.batching import _collate, length_sorted_batches, shard_batches
from small2large.losses import CE_CHUNK_ELEMENTS, record_losses, scored_mask, token_losses
from small2large.packing import pack_rows, packed_record_losses, plan_scoring_batches, to_device
from small2large.rendering import SupervisedData
from utils import IGNORE_INDEX

logger = logging.getLogger("dump_pplxs")


LOGITS_MODES = ("scored", "all")


def per_sample_loss(logits, labels, denominator: str = "nonzero"):
    """Per-record mean cross-entropy from full logits [B, T, V] and labels [B, T] (IGNORE_INDEX =
    not scored), next-token shifted, in float32. Perplexity = exp of it.

    Worked example: vocabulary of 2, one record, two scored tokens. Equal logits give loss
    ln 2 = 0.693; logits (0, 200) for target 1 give exactly 0 in float32.

        >>> import torch
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 200.0], [0.0, 0.0]]])
        >>> labels = torch.tensor([[-100, 1, 1]])   # the tokens at positions 1 and 2 are scored
        >>> per_sample_loss(logits, labels, "nonzero").exp()   # ln2 / 1 (zero-loss token not counted)
        tensor([2.])
        >>> per_sample_loss(logits, labels, "mean").exp()      # ln2 / 2 -> sqrt(2)
        tensor([1.4142])
    """
    keep, rows, tgt = _scored(labels)
    token_loss = token_losses(logits, keep.reshape(-1).nonzero().squeeze(1), tgt)
    return record_losses(token_loss, rows, labels.shape[0], denominator)


CPU_TOKEN_BUDGET = 1536  # tokens per scoring batch on a CPU: ~1-2k is fastest there (bench/bench_pplx.py)




def auto_token_budget(free_bytes: int, vocab_size: int, hidden_size: int, intermediate_size: int | None = None,
                      share: float = 0.5, floor: int = 1024, ceiling: int = 131072) -> int:
    """Default token budget of a scoring batch on a GPU, from the free memory and the model's sizes.

    Per token of a batch, the peak of a no-grad forward is bounded by its logits (vocab_size x 4
    bytes: float32, as if every position were scored) plus one layer's activations, about
    (6 x hidden_size + 3 x intermediate_size) x 4 bytes (intermediate_size defaults to 4 x hidden_size);
    the cross-entropy adds only a fixed chunk (CE_CHUNK_ELEMENTS). The budget uses ``share`` of the
    free memory, rounded down to a multiple of 256 tokens, within [floor, ceiling]. An out-of-memory
    error during scoring halves it and retries (score_pplxs), so the estimate need not be exact.

    Llama-3-8B (vocabulary 128256, hidden 4096, MLP 14336) with 40 GiB free; Qwen2.5-0.5B with 70 GiB:

        >>> auto_token_budget(40 * 2**30, 128256, 4096, 14336)
        27136
        >>> auto_token_budget(70 * 2**30, 151936, 896, 4864)
        54272
        >>> auto_token_budget(2**30, 128256, 4096)   # little free memory: the floor
        1024
    """
    intermediate = intermediate_size or 4 * hidden_size
    per_token = 4 * vocab_size + 4 * (6 * hidden_size + 3 * intermediate)
    budget = int(share * max(free_bytes - 4 * CE_CHUNK_ELEMENTS * 3, 0) // per_token) // 256 * 256
    return max(floor, min(ceiling, budget))


def default_token_budget(model, device) -> int:
    """--pplx_max_tokens when not given: CPU_TOKEN_BUDGET on a CPU; on a CUDA device
    auto_token_budget() of the memory free now (what the caching allocator holds unused counts as free)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    config = getattr(unwrap_model(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not (hasattr(text, "vocab_size") and hasattr(text, "hidden_size")):
        return CPU_TOKEN_BUDGET  # not a transformers model: no sizes to derive from
    return auto_token_budget(free, int(text.vocab_size), int(text.hidden_size), getattr(text, "intermediate_size", None))


@dataclass
class ScoreStats:
    n_records: int = 0
    n_batches: int = 0
    real_tokens: int = 0  # record tokens (no padding)
    processed_tokens: int = 0  # tokens run through the model, padding included
    n_fully_truncated: int = 0  # records with no scored token (perplexity 1.0)
    seconds: float = 0.0
    logits: str = "scored"  # the logits mode used (decided once, before scoring, the same on every process)
    max_tokens: int = 0  # the token budget at the end (lower than at the start after out-of-memory retries)
    max_tokens_start: int = 0  # the token budget at the start
    n_oom_retries: int = 0  # batches retried with a halved budget after an out-of-memory error (any process)
    n_forward: int = 0  # forward calls of this process (the same on every process: lockstep)

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.processed_tokens if self.processed_tokens else 0.0


class TorchComm:
    """The collectives of the scoring loop over torch.distributed (tests substitute threads)."""

    def __init__(self, world_size: int, device):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
        self.world_size, self.device = world_size, device

    def any(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of every process's flags (one small all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def gather(self, obj) -> list:
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of any device (never taken as a capability answer)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _scored(lab):
    """(keep [B, T] bool: positions whose next token is scored, their row, their target)."""
    keep = scored_mask(lab)
    rows = torch.arange(lab.shape[0], device=lab.device)[:, None].expand_as(lab)[keep]
    return keep, rows, lab[:, 1:][keep[:, :-1]]


def _token_losses(model, ids, lab, att, mode, chunk_elements=CE_CHUNK_ELEMENTS, index=False):
    """(token losses of the scored positions, their row) of one batch, with logits mode ``mode``.
    ``index``: logits_to_keep as a 1-D tensor of positions (one row only; what packed varlen scoring
    passes, and all that liger-kernel's forward takes) rather than a [rows, T] boolean mask."""
    keep, rows, tgt = _scored(lab)
    if mode == "scored":  # the model projects only the kept positions: logits [n_scored, V]
        if index and ids.shape[0] != 1:
            raise ValueError("logits_to_keep as positions needs a batch of one row")
        to_keep = keep[0].nonzero().squeeze(1) if index else keep
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=to_keep, use_cache=False).logits
        if logits.ndim != (3 if index else 2) or logits.shape[-2 if index else 0] != tgt.shape[0]:
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {tgt.shape[0]} scored positions")
        pos = None  # the logits are the scored positions', in order
    else:  # full logits [B, T, V]; the scored rows are read chunk by chunk, never copied at once
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        pos = keep.reshape(-1).nonzero().squeeze(1).to(logits.device)
    return token_losses(logits, pos, tgt.to(logits.device), chunk_elements), rows


def _batch_losses(model, ids, lab, att, denominator, mode, chunk_elements=CE_CHUNK_ELEMENTS):
    """Mean loss of each row of one batch (float32 [B])."""
    tl, rows = _token_losses(model, ids, lab, att, mode, chunk_elements)
    return record_losses(tl, rows.to(tl.device), lab.shape[0], denominator)


def _supports_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def decide_logits_mode(model, probe, requested: str, comm=None, index: bool = False) -> tuple[str, str]:
    """The logits mode of a whole scoring pass, decided once before it, the same on every process:
    "scored" when requested, the model's forward takes ``logits_to_keep``, and on the ``probe`` batch
    (ids, labels, attention; the same on every process) the scored-position logits give the same
    token losses as the full logits (relative 1e-2: bf16 autocast). Every process runs both probe
    forwards whatever happens (lockstep) and the verdict is agreed through ``comm``. An out-of-memory
    error is an error on every process, never taken for "not supported". ``index``: probe logits_to_keep
    as 1-D positions, the form packed varlen scoring passes (_token_losses). Returns (mode, reason for "all")."""
    if requested == "all":
        return "all", ""
    if not _supports_logits_to_keep(model):
        return "all", "its forward takes no logits_to_keep"
    if probe is None:  # nothing is scored anywhere
        return "scored", ""
    ids, lab, att = probe
    got = full = None
    oom, reason = False, ""
    for mode in ("all", "scored"):
        try:
            losses, _ = _token_losses(model, ids, lab, att, mode, index=index)
            full, got = (losses, got) if mode == "all" else (full, losses)
        except Exception as e:  # noqa: BLE001 - any failure but OOM means "cannot take the mask"
            if not is_oom(e) and mode == "all":
                raise
            oom = oom or is_oom(e)
            reason = reason or f"{type(e).__name__}: {e}"
    if not oom and not reason and not bool(((got - full).abs() <= 1e-2 * full.abs() + 1e-3).all()):
        reason = "the scored-position logits differ from the full ones"
    bad = bool(reason)
    if comm is not None:
        oom, bad = comm.any([oom, bad])
    if oom:
        raise RuntimeError(f"out of memory scoring a single record of {ids.shape[1]} tokens (the logits-mode "
                           "probe): lower --model_max_length or use more or larger GPUs")
    return ("all", reason or "another process could not use it") if bad else ("scored", "")


def _after_oom(model, device) -> None:
    """Free what a failed batch left behind: cached blocks, and FSDP2 parameters left gathered by a
    forward that raised (the next forward then gathers them again, like every other process)."""
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def score_pplxs(model, data: SupervisedData, pad_token_id: int, max_tokens: int | None = None,
                denominator: str = "nonzero", logits: str = "scored", rank: int = 0, world_size: int = 1,
                autocast=None, progress: bool = True, desc: str = "perplexity", device=None, comm=None,
                chunk_elements: int = CE_CHUNK_ELEMENTS, packed: bool = False):
    """Perplexity of every record of ``data`` (dataset order) with ``model``; returns (list of
    floats on every rank, ScoreStats of this rank's share). Exact: independent of ``max_tokens``,
    record order and ``world_size`` up to float32 rounding.

    ``device``: where inputs go and the loss is computed: the device the Trainer computes on (under
    FSDP/DeepSpeed CPU offload the parameters sit on the CPU); default: the first parameter's.
    ``max_tokens``: token budget of a batch; None: default_token_budget() (1536 on a CPU, from the
    free memory and the vocabulary on a GPU). ``autocast``: a context manager factory (e.g.
    accelerator.autocast) for mixed precision.

    Under torch.distributed pass rank/world_size: each process scores a strided share of the
    length-sorted batches and the results are gathered on every process. The processes run in
    lockstep: every step, every process makes one forward call (a process whose share is done runs
    the shortest record and drops it) and one small all-reduce that says whether any process still
    has work or ran out of memory, so a model whose forward holds collectives (FSDP, DeepSpeed
    ZeRO-3, tensor parallel) always pairs them. On out-of-memory every process halves the budget and
    re-splits its remaining batches, and the failed batch is retried; a single record that does not
    fit is an error on every process. ``comm``: the collectives (default TorchComm).

    ``packed``: the records are packed into rows under the budget (packing.plan_scoring_batches:
    first-fit decreasing, padding below 1% at any budget) and scored with position ids restarting at
    every record; with a varlen attention (flash, torch_varlen) each record attends only to itself,
    with sdpa/eager transformers masks the other records out. The same perplexities up to float
    rounding; off by default (the paper's batches, and faster with a dense mask)."""
    if logits not in LOGITS_MODES:
        raise ValueError(f"unknown logits mode {logits!r}")
    if device is None:
        device = next(model.parameters()).device
    if world_size > 1 and comm is None:
        comm = TorchComm(world_size, device)
    input_ids, labels = data.input_ids, data.labels
    lengths = [len(x) for x in input_ids]
    varlen = packed and is_varlen(implementation_of(model))
    budget, queue = _batch_plan(model, lengths, max_tokens, device, comm, rank, world_size, packed, varlen)
    stats = ScoreStats(max_tokens_start=budget)
    results, logits_mode, budget = _score_pass(
        model, input_ids, labels, lengths, queue, budget, stats, pad_token_id=pad_token_id, device=device,
        denominator=denominator, logits_mode=logits, chunk_elements=chunk_elements, comm=comm, rank=rank,
        autocast=autocast, progress=progress, desc=desc, packed=packed, varlen=varlen)
    stats.logits, stats.max_tokens = logits_mode, budget
    pplxs = _gather_pplxs(results, len(input_ids), comm)
    stats.n_fully_truncated = data.n_fully_truncated
    return pplxs, stats


def _batch_plan(model, lengths: list[int], max_tokens: int | None, device, comm, rank: int,
                world_size: int, packed: bool = False, varlen: bool = False) -> tuple[int, list]:
    """(token budget, this process's share of the batches), one plan for every process: length-sorted
    batches of record indices, or with ``packed`` packed micro-batches (lists of rows of indices)."""
    budget = max_tokens or default_token_budget(model, device)
    if comm is not None:  # one batch plan for all: the smallest budget (free memory differs by process)
        budget = min(comm.gather(budget))
    batches = _plan(lengths, list(range(len(lengths))), budget, packed, varlen)
    return budget, [batches[b] for b in shard_batches(len(batches), rank, world_size)]


def _plan(lengths: list[int], indices: list[int], budget: int, packed: bool, varlen: bool) -> list:
    """Batches of the records ``indices`` under ``budget``: length-sorted lists of indices, or with
    ``packed`` packed micro-batches (lists of rows of indices)."""
    sub = [lengths[i] for i in indices]
    if packed:
        return [[[indices[i] for i in row] for row in mb] for mb in plan_scoring_batches(sub, budget, varlen=varlen)]
    return [[indices[i] for i in b] for b in length_sorted_batches(sub, budget)]


def _records_of(item, packed: bool) -> list[int]:
    """The record indices of one batch of the plan (a packed micro-batch: its rows, in order)."""
    return [i for row in item for i in row] if packed else item


def _run_batch(model, input_ids, labels, item, *, pad_token_id, device, denominator, logits_mode, chunk_elements,
               packed, varlen):
    """Score one batch of the plan: (record indices, their mean losses on the device, real tokens, tokens
    run). A packed batch is built on the CPU and copied asynchronously, its scored positions included, so
    the host prepares the next batch while the GPU runs this one."""
    if not packed:
        ids, lab, att = _collate(input_ids, labels, item, pad_token_id, device)
        losses = _batch_losses(model, ids, lab, att, denominator, logits_mode, chunk_elements)
        return item, losses, sum(len(input_ids[i]) for i in item), att.numel()
    b = pack_rows(_Pairs(input_ids, labels), item, pad_token_id, device="cpu")
    targets = b.scoring_targets()
    inputs = b.model_inputs(varlen)
    inputs.pop("labels")
    if logits_mode == "scored":  # the vocabulary projection only at the scored positions
        one_row = varlen and b.input_ids.shape[0] == 1  # always, with varlen: the form the probe tried
        inputs["logits_to_keep"] = targets[0] if one_row else b.scored_positions()
    inputs = {k: to_device(v, device, non_blocking=True) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    targets = tuple(to_device(t, device, non_blocking=True) for t in targets)
    logits = model(**inputs).logits
    losses = packed_record_losses(logits, b, denominator, chunk_elements, targets=targets,
                                  scored_only=logits_mode == "scored")
    return b.order, losses, b.real_tokens, b.padded_tokens


class _Pairs:
    """(input_ids[i], labels[i]) by index, without building the list of pairs."""

    def __init__(self, input_ids, labels):
        self.input_ids, self.labels = input_ids, labels

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i]

    def __len__(self):
        return len(self.input_ids)


def _score_pass(model, input_ids, labels, lengths, queue, budget, stats, *, pad_token_id, device, denominator,
                logits_mode, chunk_elements, comm, rank, autocast, progress, desc, packed=False, varlen=False):
    """Decide the logits mode, then score ``queue`` in eval mode under no_grad (and ``autocast``); sets
    stats.seconds and returns (results [(indices, perplexities)], the logits mode, the final budget)."""
    # the dummy batch of a process whose share is done, and the logits-mode probe: the shortest
    # record (with a scored token for the probe), the same on every process
    by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    dummy = by_length[:1]
    probe_rec = next((i for i in by_length if any(t != IGNORE_INDEX for t in labels[i][1:])), None)
    was_training = model.training
    model.eval()
    results: list[tuple[list[int], list[float]]] = []
    t0 = time.perf_counter()
    try:
        # no_grad rather than inference_mode: inference tensors made inside FSDP's unshard or a lazily
        # built buffer would break the training steps that follow
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            probe = None if probe_rec is None else _collate(input_ids, labels, [probe_rec], pad_token_id, device)
            logits_mode, reason = decide_logits_mode(model, probe, logits_mode, comm, index=packed and varlen)
            if reason and rank == 0:  # stacklevel 3: the caller of score_pplxs
                warnings.warn(f"scoring with full logits: the model cannot project only the scored positions "
                              f"({reason})", stacklevel=3)
            budget = _score_lockstep(
                model, input_ids, labels, lengths, queue, [dummy] if packed else dummy, budget, stats, results,
                pad_token_id=pad_token_id, device=device, denominator=denominator, logits_mode=logits_mode,
                chunk_elements=chunk_elements, comm=comm, rank=rank, progress=progress, desc=desc, packed=packed,
                varlen=varlen)
    finally:
        model.train(was_training)
    if results:  # one copy to the host for the whole pass
        values = torch.cat([v.reshape(-1).float() for _, v in results]).cpu().tolist()
        starts = itertools.accumulate((len(idx) for idx, _ in results), initial=0)
        results = [(idx, values[s:s + len(idx)]) for (idx, _), s in zip(results, starts)]
    stats.seconds = time.perf_counter() - t0
    return results, logits_mode, budget


def _score_lockstep(model, input_ids, labels, lengths, queue, dummy, budget, stats, results, *, pad_token_id,
                    device, denominator, logits_mode, chunk_elements, comm, rank, progress, desc, packed=False,
                    varlen=False) -> int:
    """Score the batches of ``queue`` in lockstep with the other processes (see score_pplxs), appending
    (indices, perplexities) to ``results``; returns the final token budget."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(queue), desc=desc, disable=not progress or rank != 0, unit="batch",
               dynamic_ncols=True)
    oom = fatal = False
    while True:
        flags = [oom, bool(queue), fatal]
        any_oom, any_work, any_fatal = comm.any(flags) if comm is not None else flags
        if any_fatal:
            raise RuntimeError(
                f"out of memory scoring a single record ({'here' if fatal else 'on another process'}; "
                f"budget {budget} tokens): lower --model_max_length or use more or larger GPUs")
        if any_oom:  # every process: half the budget, its remaining batches re-split under it
            queue, budget = _halve_budget(queue, lengths, budget, stats, bar, packed, varlen)
        if not any_work:
            break
        item = queue[0] if queue else dummy
        stats.n_forward += 1
        try:
            idx, losses, real, run = _run_batch(
                model, input_ids, labels, item, pad_token_id=pad_token_id, device=device, denominator=denominator,
                logits_mode=logits_mode, chunk_elements=chunk_elements, packed=packed, varlen=varlen)
            oom = False
        except Exception as e:
            if not is_oom(e):
                raise
            oom, fatal = True, len(_records_of(item, packed)) == 1
            del e
            _after_oom(model, device)
            continue
        if not queue:
            continue  # a dummy batch: result dropped
        queue.pop(0)
        bar.update(1)
        results.append((idx, torch.exp(losses)))  # stays on the device: no wait for the GPU per batch
        stats.n_batches += 1
        stats.n_records += len(idx)
        stats.real_tokens += real
        stats.processed_tokens += run
    bar.close()
    return budget


def _halve_budget(queue, lengths, budget, stats, bar, packed=False, varlen=False) -> tuple[list, int]:
    """After an out-of-memory error on any process: (the remaining batches re-split under half the budget, it)."""
    budget = max(1, budget // 2)
    stats.n_oom_retries += 1
    queue = [sub for item in queue for sub in _plan(lengths, _records_of(item, packed), budget, packed, varlen)]
    bar.total = bar.n + len(queue)
    logger.warning("out of memory while scoring: token budget halved to %d", budget)
    return queue, budget


def _gather_pplxs(results, n: int, comm) -> list[float]:
    """The perplexities of all ``n`` records, dataset order, from every process's (indices, values)."""
    if comm is not None:
        results = [r for part in comm.gather(results) for r in part]
    pplxs: list[float | None] = [None] * n
    for idx, vals in results:
        for i, v in zip(idx, vals):
            pplxs[i] = float(v)
    missing = [i for i, v in enumerate(pplxs) if v is None]
    if missing:
        raise RuntimeError(f"{len(missing)} records were not scored (first: {missing[0]})")
    return pplxs
