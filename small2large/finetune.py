"""Fine-tuning with the Hugging Face Trainer, shared by train.py (step 4) and dump_pplxs.py (step 2):
the DataArguments and TrainingArguments dataclasses (the paper's flags), parsing them (legacy flags
translated, the CPU fallback), the Trainer set-up over the tokenized records, and the fit with resume."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from small2large import claims, record_io
from small2large.batching import DataCollatorForSupervisedDataset, SupervisedDataset
from small2large.budget_trainer import TokenBudget, TokenBudgetTrainer
from small2large.checkpoints import newest_run_id, resolve_resume
from small2large.legacy_flags import LegacyFlagError, cpu_fallback, translate_legacy_flags
from small2large.models import (
    ModelArguments,
    check_padding_free,
    load_model_and_tokenizer,
    save_merged_lora,
)
from small2large.rendering import (
    BOUNDARIES,
    CHAT_TEMPLATES,
    RenderOptions,
    SupervisedData,
    make_supervised_data,
)
from utils import HelpFormatter, UserError, fmt_share, is_main_rank, notice


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={"help": "Training records: a JSON list (the paper's), JSONL, Parquet, .gz of JSON/JSONL, a "
                          "datasets.save_to_disk folder or a hub dataset id (':SPLIT' picks a split, e.g. "
                          "databricks/databricks-dolly-15k:train) of Alpaca records (instruction, input, output), "
                          "chat records {\"messages\": [...]} or ShareGPT records {\"conversations\": [...]}."},
    )
    instruction_field: str | None = field(
        default=None,  # None: "instruction" (or the known hub dataset's column)
        metadata={"help": record_io.FIELD_HELP["instruction"]},
    )
    input_field: str | None = field(
        default=None,  # None: "input" (Dolly on the hub: "context")
        metadata={"help": record_io.FIELD_HELP["input"]},
    )
    output_field: str | None = field(
        default=None,  # None: "output" (Dolly on the hub: "response")
        metadata={"help": record_io.FIELD_HELP["output"]},
    )
    messages_field: str | None = field(
        default=None,  # None: "messages" (a "conversations" column is read as ShareGPT)
        metadata={"help": record_io.FIELD_HELP["messages"]},
    )

    response_boundary: str = field(
        default="auto",  # the paper's way except on tokenizers where it is systematically wrong
        metadata={"choices": list(BOUNDARIES),
                  "help": "Where the scored response starts in the tokens. 'paper': mask len(tokenize(prompt)) tokens "
                          "of tokenize(prompt + response), as the paper does; 'exact': where tokenize(prompt) is not a "
                          "prefix of it, tokenize prompt and response separately; 'auto' (default): exact for byte-level "
                          "BPE tokenizers that join punctuation with the next word (Llama-3, Qwen2), paper otherwise "
                          "(Llama-2, Mistral, Gemma, OPT, GPT-2, Phi). The mismatching records are always counted."},
    )
    chat_template: str = field(
        default="auto",  # the tokenizer's own template if it has one
        metadata={"choices": list(CHAT_TEMPLATES),
                  "help": "How chat records {\"messages\": [...]} are rendered: 'tokenizer' with the tokenizer's chat "
                          "template (apply_chat_template), 'builtin' with '### {Role}:' turns, 'auto' (default): the "
                          "tokenizer's if it has one. Only assistant turns (+ end-of-turn marker) are scored."},
    )
    alpaca_as_chat: bool = field(
        default=False,  # the paper's Alpaca prompt
        metadata={"help": "Render Alpaca records as a one-turn conversation (user: instruction and input, assistant: "
                          "output) with the chat template, as instruct models are used; default: the Alpaca prompt."},
    )

    def __post_init__(self):
        record_io.check_source(self.data_path, "--data_path")

    @property
    def data_fields(self) -> record_io.Fields:
        return record_io.Fields.from_args(self)

    def render_options(self):
        return RenderOptions.from_args(self)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(
        default=None,  # None: the Hugging Face cache (~/.cache/huggingface)
        metadata={"help": "Where to cache models downloaded from the hub."},
    )
    optim: str = field(
        default="adamw_torch",  # the paper's optimizer (transformers 5 would pick adamw_torch_fused)
        metadata={"help": "Optimizer name (see transformers.training_args.OptimizerNames)."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,  # None: start from --model_name_or_path
        metadata={"help": "Continue an interrupted run: a checkpoint-N folder, or 'last' for the newest "
                          "complete checkpoint-N in --output_dir (model, optimizer, scheduler, RNG and data position); "
                          "one that a killed run left half-written is skipped, with a note."},
    )
    model_max_length: int = field(
        default=512,  # tokens; the paper's value (prompt + response, longer sequences are truncated)
        metadata={"help": "Maximum sequence length in tokens (prompt + response); longer records are "
                          "truncated on the right, so a long prompt can leave no response token to train on."},
    )

    padding_free: bool = field(
        default=False,  # False: the paper's right-padded batches; same loss and gradients either way
        metadata={"help": "Pack each batch's records into one row (position ids restart at every record, "
                          "transformers masks attention block-diagonally, or flash-attention varlen on a GPU): no "
                          "padding token is computed, the batches hold the same records in the same order and "
                          "the loss is the same token average. Refused for models that cannot take packed "
                          "sequences (e.g. OPT, GPT-2). See README for when it is faster."},
    )

    max_tokens_per_micro_batch: int | None = field(
        default=None,  # None: the paper's micro-batches of --per_device_train_batch_size padded records
        metadata={"help": "Regroup the records of each optimizer step (per_device_train_batch_size x "
                          "gradient_accumulation_steps, the same records in the same steps) into as few packed "
                          "micro-batches of at most this many tokens as fit: the same gradient, far fewer "
                          "forward/backward passes. Best with a varlen --attn_implementation on a GPU; with sdpa "
                          "rows are capped so attention never costs more than the padded batches."},
    )
    max_row_tokens: int | None = field(
        default=None,  # None: the step's longest record (dense attention); varlen kernels use one row
        metadata={"help": "With --max_tokens_per_micro_batch and a dense attention (sdpa, eager): the longest "
                          "packed row. Default: the step's longest record."},
    )
    steal_claim: bool = field(
        default=False,  # False: a folder claimed by a live run is refused (one run per output folder)
        metadata={"help": "Take over --output_dir (and dump_pplxs.py's --dump_dir) even if another run claims "
                          "it (see docs/troubleshooting.md). Risk: if that run is alive, it stops at its next "
                          "write, and what it wrote until then stays in the folder, mixed with this run's."},
    )

    def __post_init__(self):
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"--max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}")
        if self.max_tokens_per_micro_batch and self.padding_free:
            raise ValueError("--max_tokens_per_micro_batch packs the records itself: drop --padding_free")
        if self.model_max_length < 1:
            raise ValueError(f"--model_max_length must be >= 1, got {self.model_max_length}")
        if self.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("--use_liger_kernel: liger-kernel is not installed (a CUDA GPU with triton: "
                             "pip install -r requirements-gpu.txt)")
        super().__post_init__()


def build_parser(extra_dataclasses: Sequence[type] = (), description: str | None = None):
    return transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, *extra_dataclasses),
        description=__doc__ if description is None else description,
        formatter_class=HelpFormatter,
    )


def parse_args(argv: Sequence[str] | None = None, extra_dataclasses: Sequence[type] = (),
               description: str | None = None) -> tuple:
    """Parse the command line into (model_args, data_args, training_args, *extras), one instance
    of each of ``extra_dataclasses`` appended. Legacy flags are translated first; without CUDA the
    CPU fallback applies. Unknown flags and invalid values are usage errors (exit 2); a missing
    --data_path file raises utils.UserError."""
    import torch

    dataclass_types = (ModelArguments, DataArguments, TrainingArguments, *extra_dataclasses)
    parser = build_parser(extra_dataclasses, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = translate_legacy_flags(argv)
    except LegacyFlagError as e:
        parser.error(str(e))
    ns = parser.parse_args(argv)  # unknown flags: exit 2
    if not torch.cuda.is_available():
        cpu_fallback(ns)
    values = vars(ns)
    out = []
    for dtype in dataclass_types:
        keys = {f.name for f in fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: v for k, v in values.items() if k in keys}))
        except (ValueError, TypeError) as e:
            parser.error(str(e))
    return tuple(out)


def build_trainer(model, tokenizer, train_data: SupervisedData, training_args: TrainingArguments,
                  callbacks: Sequence = ()) -> transformers.Trainer:
    """A Trainer over the tokenized records (no eval set): right-padded batches with the tokenizer's pad
    id, or with --padding_free each batch packed into one row, or with --max_tokens_per_micro_batch each
    step's records regrouped into packed micro-batches (budget_trainer.TokenBudgetTrainer); both packed
    paths first run check_padding_free."""
    padding_free = getattr(training_args, "padding_free", False)
    budget = getattr(training_args, "max_tokens_per_micro_batch", None)
    if padding_free or budget:
        check_padding_free(model)
    trainer_class, extra = transformers.Trainer, {}
    if budget:  # the same records per step, regrouped into packed micro-batches (budget_trainer)
        trainer_class = TokenBudgetTrainer
        extra["token_budget"] = TokenBudget.for_model(model, budget, tokenizer.pad_token_id,
                                                      max_row_tokens=training_args.max_row_tokens)
    return trainer_class(
        **extra,
        model=model,
        args=training_args,
        train_dataset=SupervisedDataset(train_data),
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id, padding_free=padding_free),
        processing_class=tokenizer,
        callbacks=list(callbacks) or None,
    )


def warn_truncated(data: SupervisedData, model_max_length: int) -> None:
    n = data.n_fully_truncated
    if n == len(data):
        raise UserError(f"every record's response is truncated away at --model_max_length {model_max_length}; "
                        "raise it")
    if n:
        notice(f"warning: {fmt_share(n, len(data))} have no response token within --model_max_length "
                f"{model_max_length} (prompt fills the window); they contribute nothing to training")


def load_training_data(data_args: DataArguments, tokenizer, training_args: TrainingArguments) -> SupervisedData:
    """The records of --data_path (column map of the --*_field flags), rendered and tokenized as the
    rendering flags say, with the boundary and truncation warnings."""
    data = make_supervised_data(data_args.data_path, tokenizer, training_args.model_max_length,
                                data_args.render_options(), fields=data_args.data_fields)
    if data.boundary_message:
        notice(data.boundary_message)
    warn_truncated(data, training_args.model_max_length)
    return data


def setup(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Model, tokenizer, data and Trainer, as both scripts train (and dump_pplxs.py --score_only scores).
    Returns (model, tokenizer, data, trainer)."""
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    data = load_training_data(data_args, tokenizer, training_args)
    return model, tokenizer, data, build_trainer(model, tokenizer, data, training_args)


@contextlib.contextmanager
def claimed_run(training_args: TrainingArguments, folders: Sequence[str] | None = None):
    """``with claimed_run(training_args, folders) as held:`` claims ``folders`` (default: --output_dir;
    the first one holds the checkpoints) for the run (small2large.claims) before anything is loaded,
    and releases them at the end, also on an error; a folder that claiming created and the run left
    empty is removed again. A live run holding one of them is a one-line ClaimHeld. Only the job's main
    process claims (torchrun: global rank 0, for every node); the others get FollowerClaims. A resumed
    run continues the run that owns the folder: its claim file's run id, else its newest checkpoint's."""
    folders = list(dict.fromkeys(os.path.abspath(f) for f in (folders or [training_args.output_dir])))
    run_id = None
    if training_args.resume_from_checkpoint:  # the same on every process: they resume the same checkpoint
        run_id = claims.owner_run_id(folders[0]) or newest_run_id(folders[0])
    if not is_main_rank():
        yield [claims.FollowerClaim(f, run_id) for f in folders]
        return
    held, created = [], []
    try:
        for folder in folders:
            if not os.path.exists(folder):
                created.append(folder)
            held.append(claims.claim_folder(folder, steal=training_args.steal_claim, run_id=run_id))
            run_id = held[0].run_id
        yield held
    finally:
        for c in held:
            c.release()
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                os.rmdir(folder)


def run_id_of(held: Sequence) -> str | None:
    """The run id of a run's claims (None without claims)."""
    return held[0].run_id if held else None


class ClaimCallback(transformers.TrainerCallback):
    """Checks before every checkpoint that the run still owns its folders (ClaimLost otherwise), and
    records the run id in every checkpoint it saves (Claim.stamp; a FollowerClaim writes nothing), so that
    --resume_from_checkpoint last never picks another run's checkpoint."""

    def __init__(self, held: Sequence):
        self.held = list(held)

    def check(self) -> None:
        claims.check_all(self.held)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.check()

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.held and os.path.isdir(ckpt):
            self.held[0].stamp(ckpt)


_RESOLVE = object()  # fit(resume=...): not resolved by the caller


def fit(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, prepare=None,
        held: Sequence = (), resume=_RESOLVE):
    """The training both scripts share: load, tokenize, train (resuming if asked), save model, tokenizer
    and trainer_state.json to --output_dir. ``prepare(trainer, data, tokenizer)`` runs just before
    training (dump_pplxs.py adds its perplexity callback there). ``held``: the run's claims (claimed_run),
    checked before every checkpoint and the final save. ``resume``: the checkpoint folder (or None) when
    the caller already resolved --resume_from_checkpoint (checkpoints.resolve_resume checks every file of
    it); by default it is resolved here. Returns the trainer."""
    guard = ClaimCallback(held)
    if resume is _RESOLVE:
        resume = resolve_resume(training_args, run_id=run_id_of(held))
    model, tokenizer, data, trainer = setup(model_args, data_args, training_args)
    trainer.add_callback(guard)
    if prepare is not None:
        prepare(trainer, data, tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    guard.check()  # the folders are still this run's before the final model is written
    trainer.save_state()  # trainer_state.json, world process zero only
    trainer.save_model(training_args.output_dir)  # gathers FSDP shards; writes from the main process only
    # (with LoRA: the adapter, adapter_config.json and adapter_model.safetensors)
    if model_args.merge_lora and trainer.is_world_process_zero():
        save_merged_lora(model_args, training_args)
    return trainer
