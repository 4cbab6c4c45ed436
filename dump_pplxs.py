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

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from utils import IGNORE_INDEX, SupervisedData, UserError, pad_batch, run_cli, write_pickle

logger = logging.getLogger("dump_pplxs")

DENOMINATORS = ("nonzero", "mean")
LOGITS_MODES = ("scored", "all")


@dataclass
class DumpArguments:
    val_data_path: str | None = field(
        default=None,
        metadata={"help": "Records whose perplexities are dumped. As in the paper they must be the training records: "
                          "if given, it must be the same file as --data_path (default: --data_path)."},
    )
    dump_dir: str = field(
        default="./dump-pplxs",
        metadata={"help": "Folder for epoch-pre.pkl, epoch-1.pkl, ... (the paper's ./dump-pplxs)."},
    )
    pplx_max_tokens: int | None = field(
        default=None,  # None: 1536 tokens on a CPU; on a GPU from free memory and vocabulary (typically 16k-64k)
        metadata={"help": "Token budget of one scoring batch (batch size x longest record, padding included). "
                          "Records are sorted by length, so padding stays at a few percent. Default: 1536 on a "
                          "CPU (fastest there); on a GPU half the free memory divided by the per-token peak "
                          "(4 bytes x vocabulary for the logits + one layer's activations), at each dump. On "
                          "out-of-memory the budget is halved and the batch retried. Does not change the results."},
    )
    pplx_denominator: str = field(
        default="nonzero",  # the paper's quirk, kept: loss sum / number of NON-ZERO token losses; "mean" is exact
        metadata={"choices": list(DENOMINATORS), "help": "Mean of the token losses: 'nonzero' divides their sum by the number of scored tokens "
                          "whose loss is non-zero (the paper's code; the default, for faithful dumps), 'mean' by "
                          "the number of scored tokens (the textbook perplexity)."},
    )
    pplx_logits: str = field(
        default="scored",
        metadata={"choices": list(LOGITS_MODES), "help": "'scored': project to the vocabulary only at the scored positions (fast, same result); "
                          "'all': full logits at every position, as the paper does (slower, for checking)."},
    )
    overwrite_dumps: bool = field(
        default=False,  # False: a fresh run refuses a --dump_dir holding another run's dumps
        metadata={"help": "A fresh run into a --dump_dir that holds another run's dumps stops with an error (they "
                          "would mix); with this flag it removes that run's dumps and manifest.json first."},
    )
    # IFD (instruction-following difficulty) needs the response scored without its prompt
    dump_noprompt: str = field(
        default="",  # off; "pre" for IFD before training (Superfiltering), "pre,3" or "all" for more epochs
        metadata={"help": "Also dump, at these epochs, the perplexity of every response scored WITHOUT its prompt "
                          "(the prompted pass's scored tokens; Alpaca: response + eos; one more scoring pass, same engine and batching) to "
                          "{dump_dir}/noprompt/epoch-{pre,1,...}.pkl, for IFD = PPL(response | prompt) / PPL(response): "
                          "comma-separated 'pre' and epoch numbers, or 'all'. Empty (default): off."},
    )
    score_only: bool = field(
        default=False,  # the paper trains; True scores the model as it is (e.g. GPT-2 for Superfiltering's IFD)
        metadata={"help": "Do not train: dump epoch-pre.pkl (and, with --dump_noprompt pre, noprompt/epoch-pre.pkl) "
                          "for the model as it is, then stop. For perplexity or IFD scores of an off-the-shelf model "
                          "(Superfiltering uses GPT-2). --output_dir is not written."},
    )

    def noprompt_epochs(self) -> set | None:
        """The epochs of --dump_noprompt ("pre" and ints), None for all, an empty set when off; a
        ValueError for anything else."""
        toks = [t.strip() for t in self.dump_noprompt.split(",") if t.strip()]
        for t in toks:
            if t not in ("pre", "all") and not (t.isdigit() and int(t) >= 1):
                raise ValueError(f"--dump_noprompt takes 'pre', epoch numbers >= 1 or 'all', comma-separated; got {t!r}")
        if "all" in toks:
            return None
        return {t if t == "pre" else int(t) for t in toks}

    def __post_init__(self):
        self.noprompt_epochs()  # checks --dump_noprompt
        if self.pplx_max_tokens is not None and self.pplx_max_tokens < 1:
            raise ValueError(f"--pplx_max_tokens must be >= 1, got {self.pplx_max_tokens}")
        if self.pplx_denominator not in DENOMINATORS:
            raise ValueError(f"--pplx_denominator must be one of {DENOMINATORS}, got {self.pplx_denominator!r}")
        if self.pplx_logits not in LOGITS_MODES:
            raise ValueError(f"--pplx_logits must be one of {LOGITS_MODES}, got {self.pplx_logits!r}")


# ----------------------------------------------------------------------------------------
# Pure maths: per-record loss, batching, sharding


def record_losses(token_loss, row, n_rows: int, denominator: str = "nonzero"):
    """Reduce per-token losses to one mean loss per record (float32).

    ``token_loss`` holds the cross-entropy of scored tokens only, ``row`` the record (row) each
    belongs to. denominator "nonzero": sum / number of tokens whose loss is != 0 (the paper's code);
    "mean": sum / number of scored tokens. A record with nothing to divide by gets loss 0 (perplexity
    1.0, the paper's value for a fully truncated record).

        >>> import torch
        >>> tl = torch.tensor([0.5, 0.0, 1.0]); row = torch.tensor([0, 0, 1])
        >>> record_losses(tl, row, 3, "nonzero")   # record 0: 0.5/1, record 1: 1.0/1, record 2: none
        tensor([0.5000, 1.0000, 0.0000])
        >>> record_losses(tl, row, 3, "mean")      # record 0: 0.5/2
        tensor([0.2500, 1.0000, 0.0000])
    """
    import torch

    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator {denominator!r}")
    token_loss = token_loss.float()
    sums = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device).index_add_(0, row, token_loss)
    counted = row if denominator == "mean" else row[token_loss != 0]
    counts = torch.bincount(counted, minlength=n_rows).to(torch.float32)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


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


def length_sorted_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group record indices into batches whose padded size (records x longest) is <= max_tokens,
    after sorting by length, longest first (ties by index, so the result is deterministic).
    A record longer than the budget gets a batch of its own.

        >>> length_sorted_batches([3, 10, 4, 9, 3], max_tokens=20)
        [[1, 3], [2, 0, 4]]
        >>> length_sorted_batches([30, 5], max_tokens=20)
        [[0], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def shard_batches(n_batches: int, rank: int, world_size: int) -> list[int]:
    """Batch numbers scored by ``rank``: a strided share (rank, rank + world_size, ...) which balances
    the work of length-sorted batches (score_pplxs keeps the processes in lockstep when shares differ).

        >>> shard_batches(5, 0, 2), shard_batches(5, 1, 2)
        ([0, 2, 4], [1, 3])
    """
    return list(range(rank, n_batches, world_size))


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(processed tokens incl. padding, real tokens) of right-padded batches.

        >>> padding_share([3, 10, 4], [[1, 2], [0]])
        (23, 17)
    """
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return processed, sum(lengths[i] for b in batches for i in b)


# ----------------------------------------------------------------------------------------
# The scoring engine

CPU_TOKEN_BUDGET = 1536  # tokens per scoring batch on a CPU: ~1-2k is fastest there (bench/bench_pplx.py)
CE_CHUNK_ELEMENTS = 1 << 24  # logits (positions x vocabulary) upcast to float32 at once: 64 MiB per chunk


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


def _unwrap(model):
    for _ in range(4):  # DDP / FSDP1 / DeepSpeed / compiled wrappers keep the real model in .module / ._orig_mod
        model = getattr(model, "module", getattr(model, "_orig_mod", model))
        if hasattr(model, "get_base_model"):  # peft (LoRA): the adapted model, LoRA layers injected in place
            model = model.get_base_model()
    return model


def default_token_budget(model, device) -> int:
    """--pplx_max_tokens when not given: CPU_TOKEN_BUDGET on a CPU; on a CUDA device
    auto_token_budget() of the memory free now (what the caching allocator holds unused counts as free)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    config = getattr(_unwrap(model), "config", None)
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


def _collate(input_ids, labels, idx, pad_token_id, device):
    ids, lab, att = pad_batch([input_ids[i] for i in idx], [labels[i] for i in idx], pad_token_id)
    return ids.to(device), lab.to(device), att.to(device)


class TorchComm:
    """The collectives of the scoring loop over torch.distributed (tests substitute threads)."""

    def __init__(self, world_size: int, device):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
        self.world_size, self.device = world_size, device

    def any(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of every process's flags (one small all-reduce)."""
        import torch
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
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def token_losses(logits, pos, targets, chunk_elements: int = CE_CHUNK_ELEMENTS):
    """Float32 cross-entropy of the rows ``pos`` of ``logits`` (viewed as [positions, V]) against
    ``targets``, computed in chunks of at most ``chunk_elements`` logits, so the float32 copy and the
    log-softmax never exceed one chunk (the full float32 logits of a 128K vocabulary would take tens
    of GB). Each row's loss is computed alone, so the chunking does not change the result.

        >>> import torch
        >>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])   # ln 2, ln(1 + e^-2), ln(1 + e^-1)
        >>> token_losses(logits, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), chunk_elements=2)
        tensor([0.6931, 0.1269, 0.3133])
    """
    import torch
    import torch.nn.functional as F

    flat = logits.reshape(-1, logits.shape[-1])
    step = max(1, chunk_elements // flat.shape[-1])
    out = torch.empty(pos.shape[0], dtype=torch.float32, device=flat.device)
    for s in range(0, pos.shape[0], step):
        out[s:s + step] = F.cross_entropy(flat[pos[s:s + step]].float(), targets[s:s + step], reduction="none")
    return out


def _scored(lab):
    """(keep [B, T] bool: positions whose next token is scored, their row, their target)."""
    import torch

    keep = torch.zeros_like(lab, dtype=torch.bool)
    keep[:, :-1] = lab[:, 1:] != IGNORE_INDEX
    rows = torch.arange(lab.shape[0], device=lab.device)[:, None].expand_as(lab)[keep]
    return keep, rows, lab[:, 1:][keep[:, :-1]]


def _token_losses(model, ids, lab, att, mode, chunk_elements=CE_CHUNK_ELEMENTS):
    """(token losses of the scored positions, their row) of one batch, with logits mode ``mode``."""
    import torch

    keep, rows, tgt = _scored(lab)
    if mode == "scored":  # the model projects only the kept positions: logits [n_scored, V]
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False).logits
        if logits.ndim != 2 or logits.shape[0] != tgt.shape[0]:
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {tgt.shape[0]} scored positions")
        pos = torch.arange(tgt.shape[0], device=logits.device)
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
        return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def decide_logits_mode(model, probe, requested: str, comm=None) -> tuple[str, str]:
    """The logits mode of a whole scoring pass, decided once before it, the same on every process:
    "scored" when requested, the model's forward takes ``logits_to_keep``, and on the ``probe`` batch
    (ids, labels, attention; the same on every process) the scored-position logits give the same
    token losses as the full logits (relative 1e-2: bf16 autocast). Every process runs both probe
    forwards whatever happens (lockstep) and the verdict is agreed through ``comm``. An out-of-memory
    error is an error on every process, never taken for "not supported". Returns (mode, reason for "all")."""
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
            losses, _ = _token_losses(model, ids, lab, att, mode)
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
    import torch

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
                chunk_elements: int = CE_CHUNK_ELEMENTS):
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
    fit is an error on every process. ``comm``: the collectives (default TorchComm)."""
    import torch
    from tqdm.auto import tqdm

    if logits not in LOGITS_MODES:
        raise ValueError(f"unknown logits mode {logits!r}")
    if device is None:
        device = next(model.parameters()).device
    if world_size > 1 and comm is None:
        comm = TorchComm(world_size, device)
    input_ids, labels = data.input_ids, data.labels
    lengths = [len(x) for x in input_ids]
    budget = max_tokens or default_token_budget(model, device)
    if comm is not None:  # one batch plan for all: the smallest budget (free memory differs by process)
        budget = min(comm.gather(budget))
    batches = length_sorted_batches(lengths, budget)
    queue = [batches[b] for b in shard_batches(len(batches), rank, world_size)]
    stats = ScoreStats(max_tokens_start=budget)
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
            logits, reason = decide_logits_mode(model, probe, logits, comm)
            if reason and rank == 0:
                warnings.warn(f"scoring with full logits: the model cannot project only the scored positions "
                              f"({reason})", stacklevel=2)
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
                    budget = max(1, budget // 2)
                    stats.n_oom_retries += 1
                    queue = [[b[i] for i in sub] for b in queue
                             for sub in length_sorted_batches([lengths[i] for i in b], budget)]
                    bar.total = bar.n + len(queue)
                    logger.warning("out of memory while scoring: token budget halved to %d", budget)
                if not any_work:
                    break
                idx = queue[0] if queue else dummy
                ids, lab, att = _collate(input_ids, labels, idx, pad_token_id, device)
                stats.n_forward += 1
                try:
                    losses = _batch_losses(model, ids, lab, att, denominator, logits, chunk_elements)
                    oom = False
                except Exception as e:
                    if not is_oom(e):
                        raise
                    oom, fatal = True, len(idx) == 1
                    del e
                    _after_oom(model, device)
                    continue
                if not queue:
                    continue  # a dummy batch: result dropped
                queue.pop(0)
                bar.update(1)
                results.append((idx, torch.exp(losses).cpu().tolist()))
                stats.n_batches += 1
                stats.n_records += len(idx)
                stats.real_tokens += int(att.sum())
                stats.processed_tokens += att.numel()
            bar.close()
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    stats.logits, stats.max_tokens = logits, budget
    if comm is not None:
        results = [r for part in comm.gather(results) for r in part]
    pplxs: list[float | None] = [None] * len(input_ids)
    for idx, vals in results:
        for i, v in zip(idx, vals):
            pplxs[i] = float(v)
    missing = [i for i, v in enumerate(pplxs) if v is None]
    if missing:
        raise RuntimeError(f"{len(missing)} records were not scored (first: {missing[0]})")
    stats.n_fully_truncated = data.n_fully_truncated
    return pplxs, stats


# ----------------------------------------------------------------------------------------
# The callback: one dump routine, before training and after every epoch


def is_whole_epoch(epoch: float) -> bool:
    return abs(epoch - round(epoch)) < 1e-6


def dump_name(epoch) -> str:
    """File name of the dump taken before training ("pre"), after whole epoch k, or after a partial last
    epoch (training stopped by --max_steps or a fractional --num_train_epochs): that one gets a name of
    its own, the epoch cut (not rounded) to 2 decimals, so it never replaces a whole epoch's dump.

        >>> [dump_name(e) for e in ("pre", 2, 2.0, 7 / 3, 0.5, 2.999)]
        ['epoch-pre.pkl', 'epoch-2.pkl', 'epoch-2.pkl', 'epoch-2.33-partial.pkl', 'epoch-0.50-partial.pkl', 'epoch-2.99-partial.pkl']
    """
    if epoch == "pre":
        return "epoch-pre.pkl"
    if is_whole_epoch(epoch):
        return f"epoch-{round(epoch)}.pkl"
    return f"epoch-{math.floor(epoch * 100 + 1e-9) / 100:.2f}-partial.pkl"


def _make_callback_class():
    from transformers import TrainerCallback

    class PerplexityDumpCallback(TrainerCallback):
        """Writes {dump_dir}/epoch-pre.pkl on_train_begin and epoch-{k}.pkl on_epoch_end (rank 0 writes)."""

        def __init__(self, data: SupervisedData, pad_token_id: int, dump_args: DumpArguments):
            self.data = data
            self.pad_token_id = pad_token_id
            self.dump_args = dump_args
            self.trainer = None  # set by attach(); gives the (wrapped) model, accelerator and ranks
            self.written: list[str] = []
            self.manifest: dict | None = None  # set by main() on global rank 0: the run's manifest.json
            self.replace: list[str] = []  # files of the run that --overwrite_dumps replaces (rank 0 removes them)
            self.ended = False  # resumed from a checkpoint at the run's last step
            self.last_stats: ScoreStats | None = None  # of the last dump (logits mode, token budget used)

        def attach(self, trainer):
            self.trainer = trainer
            return self

        def _dist(self):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return dist.get_rank(), dist.get_world_size()
            return 0, 1

        def _rank0_says(self, value):
            """Broadcast rank 0's decision so every process takes the same branch (collectives!)."""
            rank, ws = self._dist()
            if ws == 1:
                return value
            import torch.distributed as dist

            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def scoring_model(self):
            """The module whose forward the Trainer itself would run: the outermost wrapper (FSDP,
            DeepSpeed engine, compiled), except DDP, whose forward only adds a buffer broadcast."""
            from torch.nn.parallel import DistributedDataParallel

            model = self.trainer.model_wrapped
            return model.module if isinstance(model, DistributedDataParallel) else model

        def dump(self, epoch):
            tr = self.trainer
            rank, ws = self._dist()
            a = self.dump_args
            # every multi-process run scores in lockstep (score_pplxs), whatever the engine: FSDP,
            # DeepSpeed ZeRO-3 and tensor parallel forwards hold collectives; inputs go to the device
            # the Trainer computes on (under CPU offload the parameters sit on the CPU)
            pplxs, stats = score_pplxs(
                self.scoring_model(), self.data, self.pad_token_id, max_tokens=a.pplx_max_tokens,
                denominator=a.pplx_denominator, logits=a.pplx_logits, rank=rank, world_size=ws,
                autocast=tr.accelerator.autocast, device=tr.args.device, desc=f"perplexity {epoch}",
            )
            self.last_stats = stats
            if rank == 0:
                path = os.path.join(a.dump_dir, dump_name(epoch))
                write_pickle(path, pplxs)
                self.written.append(path)
                finite = [p for p in pplxs if math.isfinite(p)]
                logger.warning(
                    "%s: %d perplexities (mean %.4g) in %.1fs; this process: %d batches, padding %.1f%%, "
                    "logits %s, token budget %d (start %d, %d out-of-memory retries)",
                    path, len(pplxs), sum(finite) / max(len(finite), 1), stats.seconds, stats.n_batches,
                    100 * stats.padding_share, stats.logits, stats.max_tokens, stats.max_tokens_start,
                    stats.n_oom_retries,
                )
                if len(finite) != len(pplxs):
                    logger.warning("%s: %d perplexities are not finite", path, len(pplxs) - len(finite))
            dump_noprompt(self, epoch)  # the no-prompt pass for IFD, when asked for this epoch

        def record(self, epoch, state):
            """Right after dump(epoch): add the file to the run's manifest.json (rank 0, atomically)."""
            if self.manifest is None or self._dist()[0] != 0:
                return
            import manifest

            path = os.path.join(self.dump_args.dump_dir, dump_name(epoch))
            m = self.manifest
            m["files"][os.path.basename(path)] = manifest.file_entry(
                path, epoch, m["run_id"], partial=epoch != "pre" and not is_whole_epoch(epoch),
                global_step=state.global_step, n_records=len(self.data), world_size=m["world_size"],
                pplx_logits=self.dump_args.pplx_logits)
            if noprompt_wanted(self, epoch):  # the no-prompt dump written with it, in the same manifest
                name = f"{manifest.NOPROMPT_SUBDIR}/{dump_name(epoch)}"
                m["files"][name] = manifest.file_entry(
                    os.path.join(self.dump_args.dump_dir, name), epoch, m["run_id"],
                    partial=epoch != "pre" and not is_whole_epoch(epoch), noprompt=True,
                    global_step=state.global_step, n_records=len(self.noprompt.data), world_size=m["world_size"],
                    pplx_logits=self.dump_args.pplx_logits)
            manifest.write_manifest(self.dump_args.dump_dir, m)

        def _dump_and_record(self, epoch, state):
            self.dump(epoch)
            self.record(epoch, state)

        def _tidy(self):
            """Rank 0, before the first dump: remove the files --overwrite_dumps replaces, and the
            temporary files of a dump that a killed process left behind (the dumps themselves are
            renamed into place whole, so a kill never leaves a cut-short epoch-*.pkl)."""
            import manifest

            d = self.dump_args.dump_dir
            if self._dist()[0] != 0 or not os.path.isdir(d):
                return
            for name in self.replace:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(d, name))
            if self.replace:
                logger.warning("--overwrite_dumps: removed %s from %s", ", ".join(self.replace), d)
            self.replace = []
            for sub in (d, os.path.join(d, manifest.NOPROMPT_SUBDIR)):
                for name in os.listdir(sub) if os.path.isdir(sub) else ():
                    target = name[1:].rsplit(".", 2)[0]
                    if name.startswith(".") and name.endswith(".tmp") and (
                            manifest.DUMP_FILE.fullmatch(target) or target == manifest.MANIFEST_NAME):
                        os.remove(os.path.join(sub, name))

        def on_train_begin(self, args, state, control, **kwargs):
            self._tidy()
            self.ended = False
            if state.global_step == 0:
                self._dump_and_record("pre", state)
                return
            # resuming: epoch-pre.pkl was written by the first run and the model has changed since,
            # so it is kept. If the checkpoint sits exactly at an epoch end, or at the run's last step
            # (checkpoint saved, then the run died before its dump was recorded in the manifest), that
            # dump is written now from the same weights.
            epoch = state.epoch or 0.0
            self.ended = 0 < state.max_steps <= state.global_step
            if is_whole_epoch(epoch):
                epoch = int(round(epoch))
            if (epoch != 0 and is_whole_epoch(epoch)) or self.ended:
                name = dump_name(epoch)
                done = (name in self.manifest["files"] if self.manifest is not None
                        else os.path.exists(os.path.join(self.dump_args.dump_dir, name)))
                if self._rank0_says(not done):
                    self._dump_and_record(epoch, state)

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.ended:  # resumed from the last step: the Trainer still runs one more step, with lr 0
                logger.warning("training had already ended at the checkpoint resumed: no further dump")
                return
            epoch = state.epoch
            if not is_whole_epoch(epoch):
                logger.warning("training stopped %.4f epochs in (--max_steps or a fractional --num_train_epochs): "
                               "the partial last epoch is dumped as %s, not as a whole epoch", epoch, dump_name(epoch))
            else:
                epoch = int(round(epoch))
            self._dump_and_record(epoch, state)

    return PerplexityDumpCallback


# ----------------------------------------------------------------------------------------
# IFD: the response scored without its prompt


def make_noprompt_data(data_args, tokenizer, model_max_length: int) -> SupervisedData:
    """The records' responses alone (scores.tokenize_responses: the prompted pass's scored tokens, as
    the rendering flags render them), dataset order."""
    from scores import tokenize_responses
    from utils import load_records

    records = load_records(data_args.data_path, allow_chat=True, fields=data_args.data_fields)
    return SupervisedData(*tokenize_responses(records, tokenizer, model_max_length, data_args.render_options()))


def attach_noprompt(cb, data_args, tokenizer, model_max_length: int) -> None:
    """--dump_noprompt: give the callback a second callback of the same class over the responses alone,
    writing to {dump_dir}/noprompt/ (the same dump routine, engine, settings and processes)."""
    import dataclasses

    from manifest import NOPROMPT_SUBDIR

    sub_args = dataclasses.replace(cb.dump_args, dump_dir=os.path.join(cb.dump_args.dump_dir, NOPROMPT_SUBDIR))
    sub = type(cb)(make_noprompt_data(data_args, tokenizer, model_max_length), cb.pad_token_id, sub_args)
    cb.noprompt = sub.attach(cb.trainer)


def noprompt_wanted(cb, epoch) -> bool:
    """Whether the callback ``cb`` writes a no-prompt dump at ``epoch`` (--dump_noprompt)."""
    wanted = cb.dump_args.noprompt_epochs()
    return getattr(cb, "noprompt", None) is not None and (wanted is None or epoch in wanted)


def dump_noprompt(cb, epoch) -> None:
    """After the callback's dump at ``epoch``: the no-prompt dump, if --dump_noprompt asks for this epoch."""
    if not noprompt_wanted(cb, epoch):
        return
    sub = cb.noprompt
    n = len(sub.written)
    sub.dump(epoch)
    cb.written += sub.written[n:]


def score_only(model_args, data_args, training_args, dump_args) -> list[str]:
    """--score_only: the dumps of the untrained model (epoch-pre.pkl, and noprompt/epoch-pre.pkl with
    --dump_noprompt pre), through the same Trainer set-up and callback as a training run, no training.
    --dump_dir is checked as a fresh training run's (another run's dumps only with --overwrite_dumps),
    and the dumps are recorded in a new manifest.json marked score_only."""
    import train

    run = _start_manifest(data_args, training_args, dump_args, None) if train.is_main_rank() else None
    _, tokenizer, data, trainer = train.setup(model_args, data_args, training_args)
    dumper = _make_callback_class()(data, tokenizer.pad_token_id, dump_args).attach(trainer)
    if run is not None:
        dumper.manifest, dumper.replace = _settle_manifest(run, data, tokenizer, model_args, data_args,
                                                           training_args, dump_args)
        dumper.manifest.update(score_only=True, output_dir=None)  # nothing trained, --output_dir not written
    if dump_args.dump_noprompt:
        attach_noprompt(dumper, data_args, tokenizer, training_args.model_max_length)
    dumper._tidy()
    dumper._dump_and_record("pre", trainer.state)
    return dumper.written


# ----------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    """train.py's flags (the paper's, legacy ones translated) plus DumpArguments."""
    import train

    model_args, data_args, training_args, dump_args = train.parse_args(
        argv, extra_dataclasses=(DumpArguments,), description=__doc__)
    return model_args, data_args, training_args, dump_args


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _start_manifest(data_args, training_args, dump_args, ckpt) -> dict:
    """Global rank 0, before loading anything: check --dump_dir against the run. A fresh run refuses a
    folder holding another run's dumps (unless --overwrite_dumps, which replaces them); a resumed run
    continues the run recorded there (same --output_dir, same dataset) under the same run id."""
    import data
    import manifest

    d = dump_args.dump_dir
    dataset = {"path": os.path.abspath(data_args.data_path), "sha256": data.fingerprint(data_args.data_path)}
    old = manifest.read_manifest(d)
    if ckpt is None:
        replace = manifest.check_fresh_dump_dir(d, dump_args.overwrite_dumps)
        return {"replace": replace, "dataset": dataset}
    manifest.check_resume(old, d, ckpt, dataset)
    return {"old": old, "replace": [], "dataset": dataset}


def run_settings(tokenizer, model_args, data_args, training_args, dump_args) -> dict:
    """The settings a manifest records: those that change the perplexities (model, tokenizer, window,
    denominator, seed, the rendering flags and column map that decide the scored tokens, LoRA) and the
    logits mode."""
    lora = None
    if model_args.lora_r:
        lora = {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                "target_modules": model_args.lora_target_modules}
    return {"model": model_args.model_name_or_path, "tokenizer": tokenizer.name_or_path,
            "model_max_length": training_args.model_max_length, "pplx_denominator": dump_args.pplx_denominator,
            "pplx_logits": dump_args.pplx_logits, "seed": training_args.seed,
            "response_boundary": data_args.response_boundary, "chat_template": data_args.chat_template,
            "alpaca_as_chat": data_args.alpaca_as_chat, "fields": data_args.data_fields.resolved(), "lora": lora}


def _settle_manifest(run, data, tokenizer, model_args, data_args, training_args, dump_args) -> tuple[dict, list[str]]:
    """The run's manifest (dataset, model, settings, versions) and the files to replace; a resumed run
    keeps its run id and files and must have the settings its dumps were made with."""
    import manifest
    import train

    settings = run_settings(tokenizer, model_args, data_args, training_args, dump_args)
    old = run.get("old")
    manifest.check_settings(old, settings, dump_args.dump_dir)
    m = old if old is not None else {"format": manifest.FORMAT, "run_id": manifest.new_run_id(),
                                     "started": manifest.now(), "files": {}}
    m.update(output_dir=os.path.abspath(training_args.output_dir), dataset={**run["dataset"], "n_records": len(data)},
             settings=settings, world_size=training_args.world_size, versions=manifest.package_versions())
    if old is None and training_args.resume_from_checkpoint:  # resuming a run made before manifests existed
        for name in manifest.dump_files(dump_args.dump_dir):
            epoch = manifest.epoch_of(name)
            extra = {"noprompt": True} if name.startswith(f"{manifest.NOPROMPT_SUBDIR}/") else {}
            m["files"][name] = manifest.file_entry(os.path.join(dump_args.dump_dir, name), epoch, m["run_id"],
                                                   partial=isinstance(epoch, float), adopted=True, **extra)
        if m["files"]:
            train.notice(f"note: {dump_args.dump_dir} has no manifest.json: its dumps {', '.join(m['files'])} are "
                         f"taken as this run's (run {m['run_id']})")
    return m, run["replace"]


def main(args=None, callbacks: Sequence = ()):
    """Train as train.py does and dump the perplexities. ``args``: argv list or parse_args() tuple;
    ``callbacks``: extra TrainerCallbacks (tests use one to kill a run mid-epoch)."""
    if args is None or isinstance(args, list):
        args = parse_args(args)
    model_args, data_args, training_args, dump_args = args
    import train
    from utils import fmt_share

    if dump_args.val_data_path is not None and not _same_file(dump_args.val_data_path, data_args.data_path):
        raise UserError(
            f"--val_data_path {dump_args.val_data_path} differs from --data_path {data_args.data_path}: the "
            "perplexities are those of the training records (as in the paper); pass the same file or omit it"
        )
    if dump_args.score_only:  # dumps of the model as it is, no training
        return score_only(model_args, data_args, training_args, dump_args)
    ckpt = train.resolve_resume(training_args)  # the newest complete checkpoint for "last"
    if ckpt is not None:
        training_args.resume_from_checkpoint = ckpt  # resolved once: fit() gets the folder
    run = _start_manifest(data_args, training_args, dump_args, ckpt) if train.is_main_rank() else None
    dumper = None

    def add_dumper(trainer, data, tokenizer):
        nonlocal dumper
        if data.n_fully_truncated:
            train.notice(f"warning: {fmt_share(data.n_fully_truncated, len(data))} are fully truncated: their "
                         "perplexity is dumped as 1.0 (as in the paper)")
        dumper = _make_callback_class()(data, tokenizer.pad_token_id, dump_args).attach(trainer)
        if run is not None:
            dumper.manifest, dumper.replace = _settle_manifest(run, data, tokenizer, model_args, data_args,
                                                               training_args, dump_args)
        if dump_args.dump_noprompt:  # the no-prompt pass for IFD
            attach_noprompt(dumper, data_args, tokenizer, training_args.model_max_length)
        for cb in (dumper, *callbacks):
            trainer.add_callback(cb)

    train.fit(model_args, data_args, training_args, prepare=add_dumper)
    return dumper.written

if __name__ == "__main__":
    sys.exit(run_cli(main))
