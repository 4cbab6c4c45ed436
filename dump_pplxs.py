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
  * records sorted by length into batches under a token budget (--pplx_max_tokens), dataset order
    restored afterwards (padding is a few percent of the processed tokens, vs ~30% for the paper's
    dataset-order batches of 4);
  * the vocabulary projection and the loss only on the scored positions (transformers'
    ``logits_to_keep`` boolean mask), falling back to full logits where a model does not support it;
  * under torchrun each process scores a strided share of the batches, rank 0 gathers and writes
    (under FSDP shorter shards run dummy batches so every process makes the same forward calls).
The result does not depend on the token budget, the record order or the number of processes
(within 1e-5 relative in float32).

Resuming (--resume_from_checkpoint) keeps the dumps already written: epoch-pre.pkl is not
recomputed (the model has changed), and an epoch dump missed because the run died right after
an end-of-epoch checkpoint is written from that checkpoint.
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
    pplx_max_tokens: int = field(
        default=1536,  # tokens per scoring batch incl. padding; ~1-2k is fastest on CPU, 16k-64k suits a GPU
        metadata={"help": "Token budget of one scoring batch (batch size x longest record, padding included). "
                          "Records are sorted by length, so padding stays at a few percent. ~1000-2000 is fastest "
                          "on CPU; on a GPU use as much as memory allows (e.g. 32768). Does not change the results."},
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

    # issue 9: IFD (instruction-following difficulty) needs the response scored without its prompt
    dump_noprompt: str = field(
        default="",  # off; "pre" for IFD before training (Superfiltering), "pre,3" or "all" for more epochs
        metadata={"help": "Also dump, at these epochs, the perplexity of every response scored WITHOUT its prompt "
                          "(response + eos; one more scoring pass, same engine and batching) to "
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
        """The epochs of --dump_noprompt ("pre" and ints), None for all, an empty set when off."""
        toks = [t.strip() for t in self.dump_noprompt.split(",") if t.strip()]
        if "all" in toks:
            return None
        return {t if t == "pre" else int(t) for t in toks}

    def __post_init__(self):
        for t in (t.strip() for t in self.dump_noprompt.split(",") if t.strip()):
            if t not in ("pre", "all") and not (t.isdigit() and int(t) >= 1):
                raise ValueError(f"--dump_noprompt takes 'pre', epoch numbers >= 1 or 'all', comma-separated; got {t!r}")
        if self.pplx_max_tokens < 1:
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
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    token_loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")
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


def shard_batches(n_batches: int, rank: int, world_size: int, lockstep: bool = False) -> list[int | None]:
    """Batch numbers scored by ``rank``: a strided share (rank, rank + world_size, ...) which balances
    the work of length-sorted batches. With ``lockstep`` (FSDP: every process must make the same
    forward calls) shorter shards are padded with None = run a dummy batch, drop its result.

        >>> shard_batches(5, 0, 2), shard_batches(5, 1, 2)
        ([0, 2, 4], [1, 3])
        >>> shard_batches(5, 1, 2, lockstep=True)
        [1, 3, None]
    """
    mine: list[int | None] = list(range(rank, n_batches, world_size))
    if lockstep:
        mine += [None] * (math.ceil(n_batches / world_size) - len(mine))
    return mine


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(processed tokens incl. padding, real tokens) of right-padded batches.

        >>> padding_share([3, 10, 4], [[1, 2], [0]])
        (23, 17)
    """
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return processed, sum(lengths[i] for b in batches for i in b)


# ----------------------------------------------------------------------------------------
# The scoring engine


@dataclass
class ScoreStats:
    n_records: int = 0
    n_batches: int = 0
    real_tokens: int = 0  # record tokens (no padding)
    processed_tokens: int = 0  # tokens run through the model, padding included
    n_fully_truncated: int = 0  # records with no scored token (perplexity 1.0)
    seconds: float = 0.0
    logits: str = "scored"  # what was actually used ("all" after a fallback)

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.processed_tokens if self.processed_tokens else 0.0


def _collate(input_ids, labels, idx, pad_token_id, device):
    ids, lab, att = pad_batch([input_ids[i] for i in idx], [labels[i] for i in idx], pad_token_id)
    return ids.to(device), lab.to(device), att.to(device)


def _all_gather(obj, world_size: int) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _supports_logits_to_keep(model) -> bool:
    import inspect

    inner = model
    for _ in range(4):  # DDP / FSDP1 / compiled wrappers keep the real model in .module / ._orig_mod
        inner = getattr(inner, "module", getattr(inner, "_orig_mod", inner))
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _batch_losses(model, ids, lab, att, denominator, mode):
    """Mean loss of each row of one batch; returns (losses [B] float32, mode actually used)."""
    import torch
    import torch.nn.functional as F

    targets = lab[:, 1:]
    keep = torch.zeros_like(lab, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX  # positions whose next token is scored
    rows = torch.arange(lab.shape[0], device=lab.device)[:, None].expand_as(lab)[keep]
    tgt = lab[:, 1:][keep[:, :-1]]
    if mode == "scored":
        try:
            out = model(input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False)
            logits = out.logits
            if logits.ndim != 2 or logits.shape[0] != tgt.shape[0]:
                raise ValueError(f"logits of shape {tuple(logits.shape)} for {tgt.shape[0]} scored positions")
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            warnings.warn(f"scoring with full logits: the model does not take a logits_to_keep mask ({e})",
                          stacklevel=3)
            mode = "all"
    if mode == "all":
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[keep]
    token_loss = F.cross_entropy(logits.float(), tgt, reduction="none")  # float32 from the (upcast) logits
    return record_losses(token_loss, rows, lab.shape[0], denominator), mode


def score_pplxs(model, data: SupervisedData, pad_token_id: int, max_tokens: int = 1536,
                denominator: str = "nonzero", logits: str = "scored", rank: int = 0, world_size: int = 1,
                lockstep: bool = False, autocast=None, progress: bool = True, desc: str = "perplexity",
                gather=None):
    """Perplexity of every record of ``data`` (dataset order) with ``model``; returns (list of
    floats on every rank, ScoreStats of this rank's share). Exact: independent of ``max_tokens``,
    record order and ``world_size`` up to float32 rounding.

    Under torch.distributed pass rank/world_size: each process scores a strided share of the
    length-sorted batches and the results are gathered on every process (all_gather_object).
    ``lockstep`` (needed under FSDP) makes every process run the same number of forward calls.
    ``autocast``: a context manager factory (e.g. accelerator.autocast) for mixed precision.
    ``gather``: replaces torch.distributed.all_gather_object (local results -> list of every rank's)."""
    import torch
    from tqdm.auto import tqdm

    if logits not in LOGITS_MODES:
        raise ValueError(f"unknown logits mode {logits!r}")
    if logits == "scored" and not _supports_logits_to_keep(model):
        logits = "all"
    input_ids, labels = data.input_ids, data.labels
    lengths = [len(x) for x in input_ids]
    batches = length_sorted_batches(lengths, max_tokens)
    mine = shard_batches(len(batches), rank, world_size, lockstep)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stats = ScoreStats(logits=logits)
    results: list[tuple[list[int], list[float]]] = []
    t0 = time.perf_counter()
    try:
        # no_grad rather than inference_mode: inference tensors made inside FSDP's unshard or a lazily
        # built buffer would break the training steps that follow
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            for b in tqdm(mine, desc=desc, disable=not progress or rank != 0, unit="batch", dynamic_ncols=True):
                idx = batches[b] if b is not None else batches[-1]  # dummy: the smallest batch, result dropped
                ids, lab, att = _collate(input_ids, labels, idx, pad_token_id, device)
                losses, logits = _batch_losses(model, ids, lab, att, denominator, logits)
                if b is None:
                    continue
                results.append((idx, torch.exp(losses).cpu().tolist()))
                stats.n_batches += 1
                stats.n_records += len(idx)
                stats.real_tokens += int(att.sum())
                stats.processed_tokens += att.numel()
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - t0
    stats.logits = logits
    if world_size > 1:
        results = [r for part in (gather or _all_gather)(results, world_size) for r in part]
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


def dump_name(epoch) -> str:
    return "epoch-pre.pkl" if epoch == "pre" else f"epoch-{epoch}.pkl"


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

        def dump(self, epoch):
            tr = self.trainer
            fsdp = bool(getattr(tr, "is_fsdp_enabled", False))
            # under DDP trainer.model is the bare model (no collectives in its forward); under FSDP
            # only the wrapper can run the forward, so every process runs it the same number of times
            model = tr.model_wrapped if fsdp else tr.model
            rank, ws = self._dist()
            a = self.dump_args
            pplxs, stats = score_pplxs(
                model, self.data, self.pad_token_id, max_tokens=a.pplx_max_tokens, denominator=a.pplx_denominator,
                logits=a.pplx_logits, rank=rank, world_size=ws, lockstep=fsdp, autocast=tr.accelerator.autocast,
                desc=f"perplexity {epoch}",
            )
            if rank == 0:
                path = os.path.join(a.dump_dir, dump_name(epoch))
                write_pickle(path, pplxs)
                self.written.append(path)
                finite = [p for p in pplxs if math.isfinite(p)]
                logger.warning(
                    "%s: %d perplexities (mean %.4g) in %.1fs; this process: %d batches, padding %.1f%%, logits %s",
                    path, len(pplxs), sum(finite) / max(len(finite), 1), stats.seconds, stats.n_batches,
                    100 * stats.padding_share, stats.logits,
                )
                if len(finite) != len(pplxs):
                    logger.warning("%s: %d perplexities are not finite", path, len(pplxs) - len(finite))
            dump_noprompt(self, epoch)  # issue 9: the no-prompt pass for IFD, when asked for this epoch

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.dump("pre")
                return
            # resuming: epoch-pre.pkl was written by the first run and the model has changed since,
            # so it is kept. If the checkpoint sits exactly at an epoch end (checkpoint saved, then the
            # run died before its dump), that epoch's dump is written now from the same weights.
            epoch = state.epoch or 0.0
            k = int(round(epoch))
            missing = (k >= 1 and abs(epoch - k) < 1e-9
                       and not os.path.exists(os.path.join(self.dump_args.dump_dir, dump_name(k))))
            if self._rank0_says(missing):
                self.dump(k)

        def on_epoch_end(self, args, state, control, **kwargs):
            k = int(round(state.epoch))
            if abs(state.epoch - k) > 1e-6:
                logger.warning("epoch ended at a fractional epoch %.4f (max_steps?): dumping as epoch-%d", state.epoch, k)
            self.dump(k)

    return PerplexityDumpCallback


# ----------------------------------------------------------------------------------------
# IFD: the response scored without its prompt (issue 9)


NOPROMPT_SUBDIR = "noprompt"  # {dump_dir}/noprompt/epoch-pre.pkl, ...: the no-prompt dumps, same names


def make_noprompt_data(data_path: str, tokenizer, model_max_length: int) -> SupervisedData:
    """The records' responses alone (scores.tokenize_responses), dataset order."""
    from scores import tokenize_responses
    from utils import load_records

    return SupervisedData(*tokenize_responses(load_records(data_path, allow_chat=True), tokenizer, model_max_length))


def attach_noprompt(cb, data_path: str, tokenizer, model_max_length: int) -> None:
    """--dump_noprompt: give the callback a second callback of the same class over the responses alone,
    writing to {dump_dir}/noprompt/ (the same dump routine, engine, settings and processes)."""
    import dataclasses

    sub_args = dataclasses.replace(cb.dump_args, dump_dir=os.path.join(cb.dump_args.dump_dir, NOPROMPT_SUBDIR))
    sub = type(cb)(make_noprompt_data(data_path, tokenizer, model_max_length), cb.pad_token_id, sub_args)
    cb.noprompt = sub.attach(cb.trainer)


def dump_noprompt(cb, epoch) -> None:
    """After the callback's dump at ``epoch``: the no-prompt dump, if --dump_noprompt asks for this epoch."""
    sub = getattr(cb, "noprompt", None)
    wanted = cb.dump_args.noprompt_epochs()
    if sub is None or (wanted is not None and epoch not in wanted):
        return
    n = len(sub.written)
    sub.dump(epoch)
    cb.written += sub.written[n:]


def score_only(model_args, data_args, training_args, dump_args) -> list[str]:
    """--score_only: the dumps of the untrained model (epoch-pre.pkl, and noprompt/epoch-pre.pkl with
    --dump_noprompt pre), through the same Trainer set-up and callback as a training run, no training."""
    import train

    model, tokenizer = train.load_model_and_tokenizer(model_args, training_args)
    data = train.make_supervised_data(data_args.data_path, tokenizer, training_args.model_max_length)
    train.warn_truncated(data, training_args.model_max_length)
    trainer = train.build_trainer(model, tokenizer, data, training_args)
    dumper = _make_callback_class()(data, tokenizer.pad_token_id, dump_args).attach(trainer)
    if dump_args.dump_noprompt:
        attach_noprompt(dumper, data_args.data_path, tokenizer, training_args.model_max_length)
    dumper.dump("pre")
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
    if dump_args.score_only:  # issue 9: dumps of the model as it is, no training
        return score_only(model_args, data_args, training_args, dump_args)
    ckpt = train.resolve_resume(training_args)  # a checkpoint folder, or "last" in --output_dir
    if ckpt is None and os.path.isdir(dump_args.dump_dir):
        stale = sorted(f for f in os.listdir(dump_args.dump_dir) if f.startswith("epoch-") and f.endswith(".pkl"))
        if stale and train.is_main_rank():
            logger.warning("%s already holds %s from an earlier run: a fresh run overwrites the dumps it writes",
                           dump_args.dump_dir, ", ".join(stale))
    dumper = None

    def add_dumper(trainer, data, tokenizer):
        nonlocal dumper
        if data.n_fully_truncated:
            train.notice(f"warning: {fmt_share(data.n_fully_truncated, len(data))} are fully truncated: their "
                         "perplexity is dumped as 1.0 (as in the paper)")
        dumper = _make_callback_class()(data, tokenizer.pad_token_id, dump_args).attach(trainer)
        if dump_args.dump_noprompt:  # issue 9: the no-prompt pass for IFD
            attach_noprompt(dumper, data_args.data_path, tokenizer, training_args.model_max_length)
        for cb in (dumper, *callbacks):
            trainer.add_callback(cb)

    train.fit(model_args, data_args, training_args, prepare=add_dumper)
    return dumper.written

if __name__ == "__main__":
    sys.exit(run_cli(main))
