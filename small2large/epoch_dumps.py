"""Step 2's dumps during training: the TrainerCallback that scores every record before training
(epoch-pre.pkl) and after every epoch (epoch-1.pkl, ...), records each dump in the folder's
manifest.json, and optionally scores the responses without their prompts (--dump_noprompt, for IFD);
plus --score_only (the dumps of an untrained model) and dump_pplxs.py's DumpArguments."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import TrainerCallback

from small2large import claims, finetune, manifest
from small2large.dumps import dump_name, is_whole_epoch
from small2large.losses import DENOMINATORS
from small2large.manifest import NOPROMPT_SUBDIR, settle_manifest, start_manifest
from small2large.record_io import load_records
from small2large.rendering import SupervisedData, tokenize_responses
from small2large.scoring import LOGITS_MODES, ScoreStats, score_pplxs
from utils import is_main_rank, write_pickle

logger = logging.getLogger("dump_pplxs")


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
    pplx_packing: bool = field(
        default=False,  # False: the length-sorted padded batches (exact, and faster with sdpa)
        metadata={"help": "Score records packed into rows under --pplx_max_tokens (padding below 2%% at any budget), "
                          "position ids restarting at every record. Worth it with a varlen --attn_implementation "
                          "(torch_varlen, flash_attention_2) on a GPU; the same perplexities up to float rounding."},
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


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, (0, 1) without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank0_says(value):
    """Broadcast rank 0's decision so every process takes the same branch (collectives!)."""
    if process_rank()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PerplexityDumpCallback(TrainerCallback):
    """Writes {dump_dir}/epoch-pre.pkl on_train_begin and epoch-{k}.pkl on_epoch_end (rank 0 writes)."""

    def __init__(self, data: SupervisedData, pad_token_id: int, dump_args: DumpArguments, held: Sequence = ()):
        self.data = data
        self.held = list(held)  # the run's folder claims (finetune.claimed_run): checked before every write
        self.pad_token_id = pad_token_id
        self.dump_args = dump_args
        self.trainer = None  # set by attach(); gives the (wrapped) model, accelerator and ranks
        self.written: list[str] = []
        self.manifest: dict | None = None  # set by main() on global rank 0: the run's manifest.json
        self.replace: list[str] = []  # files of the run that --overwrite_dumps replaces (rank 0 removes them)
        self.ended = False  # resumed from a checkpoint at the run's last step
        self.last_stats: ScoreStats | None = None  # of the last dump (logits mode, token budget used)
        self.noprompt: PerplexityDumpCallback | None = None  # --dump_noprompt: the same dumps of the responses alone

    def attach(self, trainer):
        self.trainer = trainer
        return self

    def scoring_model(self):
        """The module whose forward the Trainer itself would run: the outermost wrapper (FSDP,
        DeepSpeed engine, compiled), except DDP, whose forward only adds a buffer broadcast."""
        from torch.nn.parallel import DistributedDataParallel

        model = self.trainer.model_wrapped
        return model.module if isinstance(model, DistributedDataParallel) else model

    def dump(self, epoch):
        tr = self.trainer
        rank, ws = process_rank()
        a = self.dump_args
        # every multi-process run scores in lockstep (score_pplxs), whatever the engine: FSDP,
        # DeepSpeed ZeRO-3 and tensor parallel forwards hold collectives; inputs go to the device
        # the Trainer computes on (under CPU offload the parameters sit on the CPU)
        pplxs, stats = score_pplxs(
            self.scoring_model(), self.data, self.pad_token_id, max_tokens=a.pplx_max_tokens,
            denominator=a.pplx_denominator, logits=a.pplx_logits, rank=rank, world_size=ws,
            autocast=tr.accelerator.autocast, device=tr.args.device, desc=f"perplexity {epoch}",
            packed=a.pplx_packing,
        )
        self.last_stats = stats
        if rank == 0:
            path = os.path.join(a.dump_dir, dump_name(epoch))
            self.check_claims()
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
        self.dump_noprompt(epoch)  # the no-prompt pass for IFD, when asked for this epoch

    def record(self, epoch, state):
        """Right after dump(epoch): add the file to the run's manifest.json (rank 0, atomically)."""
        if self.manifest is None or process_rank()[0] != 0:
            return

        path = os.path.join(self.dump_args.dump_dir, dump_name(epoch))
        m = self.manifest
        m["files"][os.path.basename(path)] = manifest.file_entry(
            path, epoch, m["run_id"], partial=epoch != "pre" and not is_whole_epoch(epoch),
            global_step=state.global_step, n_records=len(self.data), world_size=m["world_size"],
            pplx_logits=self.dump_args.pplx_logits)
        if self.noprompt_wanted(epoch):  # the no-prompt dump written with it, in the same manifest
            name = f"{manifest.NOPROMPT_SUBDIR}/{dump_name(epoch)}"
            m["files"][name] = manifest.file_entry(
                os.path.join(self.dump_args.dump_dir, name), epoch, m["run_id"],
                partial=epoch != "pre" and not is_whole_epoch(epoch), noprompt=True,
                global_step=state.global_step, n_records=len(self.noprompt.data), world_size=m["world_size"],
                pplx_logits=self.dump_args.pplx_logits)
        self.check_claims()
        manifest.write_manifest(self.dump_args.dump_dir, m)

    def check_claims(self) -> None:
        """Before every write: the run still owns its folders (claims.ClaimLost otherwise)."""
        claims.check_all(self.held)

    def dump_and_record(self, epoch, state):
        self.dump(epoch)
        self.record(epoch, state)

    def tidy(self):
        """Rank 0, before the first dump: remove the files --overwrite_dumps replaces, and the
        temporary files of a dump that a killed process left behind (the dumps themselves are
        renamed into place whole, so a kill never leaves a cut-short epoch-*.pkl)."""

        d = self.dump_args.dump_dir
        if process_rank()[0] != 0 or not os.path.isdir(d):
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

    def attach_noprompt(self, data_args, tokenizer, model_max_length: int) -> None:
        """--dump_noprompt: give this callback a second one of the same class over the responses alone,
        writing to {dump_dir}/noprompt/ (the same dump routine, engine, settings and processes)."""

        sub_args = dataclasses.replace(self.dump_args, dump_dir=os.path.join(self.dump_args.dump_dir, NOPROMPT_SUBDIR))
        sub = type(self)(make_noprompt_data(data_args, tokenizer, model_max_length), self.pad_token_id, sub_args,
                         self.held)
        self.noprompt = sub.attach(self.trainer)

    def noprompt_wanted(self, epoch) -> bool:
        """Whether this callback writes a no-prompt dump at ``epoch`` (--dump_noprompt)."""
        wanted = self.dump_args.noprompt_epochs()
        return self.noprompt is not None and (wanted is None or epoch in wanted)

    def dump_noprompt(self, epoch) -> None:
        """After the callback's dump at ``epoch``: the no-prompt dump, if --dump_noprompt asks for this epoch."""
        if not self.noprompt_wanted(epoch):
            return
        sub = self.noprompt
        n = len(sub.written)
        sub.dump(epoch)
        self.written += sub.written[n:]

    def on_train_begin(self, args, state, control, **kwargs):
        self.tidy()
        self.ended = False
        if state.global_step == 0:
            self.dump_and_record("pre", state)
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
            if rank0_says(not done):
                self.dump_and_record(epoch, state)

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
        self.dump_and_record(epoch, state)


def make_noprompt_data(data_args, tokenizer, model_max_length: int) -> SupervisedData:
    """The records' responses alone (scores.tokenize_responses: the prompted pass's scored tokens, as
    the rendering flags render them), dataset order."""

    records = load_records(data_args.data_path, allow_chat=True, fields=data_args.data_fields)
    return SupervisedData(*tokenize_responses(records, tokenizer, model_max_length, data_args.render_options()))


def score_only(model_args, data_args, training_args, dump_args, held: Sequence = ()) -> list[str]:
    """--score_only: the dumps of the untrained model (epoch-pre.pkl, and noprompt/epoch-pre.pkl with
    --dump_noprompt pre), through the same Trainer set-up and callback as a training run, no training.
    --dump_dir is checked as a fresh training run's (another run's dumps only with --overwrite_dumps),
    and the dumps are recorded in a new manifest.json marked score_only."""

    run = start_manifest(data_args, training_args, dump_args, None) if is_main_rank() else None
    _, tokenizer, data, trainer = finetune.setup(model_args, data_args, training_args)
    dumper = PerplexityDumpCallback(data, tokenizer.pad_token_id, dump_args, held).attach(trainer)
    if run is not None:
        dumper.manifest, dumper.replace = settle_manifest(run, data, tokenizer, model_args, data_args,
                                                           training_args, dump_args)
        dumper.manifest.update(score_only=True, output_dir=None)  # nothing trained, --output_dir not written
    if dump_args.dump_noprompt:
        dumper.attach_noprompt(data_args, tokenizer, training_args.model_max_length)
    dumper.tidy()
    dumper.dump_and_record("pre", trainer.state)
    return dumper.written
