r"""Step 4: fine-tune the large (target) model on the chosen subset with the Hugging Face Trainer.

    # the paper's command (4 GPUs, FSDP), unchanged: the flags transformers 5 removed are translated
    torchrun --nproc_per_node=4 --master_port=1234 train.py \
        --model_name_or_path meta-llama/Llama-2-7b-hf --data_path data/10_low_lp1-alpaca-llama2-7b.json \
        --bf16 True --output_dir ./output --num_train_epochs 3 \
        --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --gradient_accumulation_steps 8 \
        --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 --save_total_limit 1 \
        --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" \
        --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \
        --tf32 True --seed 42 --gradient_checkpointing True

    # tiny CPU run (about a minute on 2 cores; drop --max_steps for a full epoch, ~5 minutes):
    # a random-initialised model made locally, no download
    python examples/make_tiny_models.py --dataset data/sample_train.json --output_dir runs/models
    python train.py --model_name_or_path runs/models/target --data_path data/sample_train.json \
        --output_dir runs/target-ft --num_train_epochs 1 --max_steps 60 --per_device_train_batch_size 4 \
        --learning_rate 1e-3 --logging_steps 10 --save_strategy steps --save_steps 30

    # continue an interrupted run from its last checkpoint in --output_dir (or give a checkpoint folder)
    python train.py ... --resume_from_checkpoint last

Records are Alpaca records (instruction, input, output; JSON list or JSONL, optionally .gz) or
chat records {"messages": [...]}; they are formatted with the Stanford Alpaca prompt and only the
response tokens (+ eos) are trained on (see utils.tokenize_records). The model, tokenizer and
trainer_state.json are written to --output_dir.

Flags from transformers 4.x that 5.x removed are rewritten with a one-line notice
(translate_legacy_flags): --evaluation_strategy -> --eval_strategy, --warmup_ratio R ->
--warmup_steps R (a float below 1 is a ratio of the total steps in 5.x, rounded up as before),
--fsdp_transformer_layer_cls_to_wrap X -> --fsdp_config '{"transformer_layer_cls_to_wrap": ["X"]}'
(merged into any --fsdp_config given), and the deprecated --gradient_checkpointing ->
--activation_checkpointing. On a machine without CUDA the same command runs on the CPU: --tf32
and --fp16 are dropped with a warning, --bf16 becomes CPU bfloat16 autocast, and --fsdp is dropped
("falling back to plain data parallel": DDP over gloo when launched by torchrun).

--padding_free packs each batch's records into one row (same records, same order, no padding; same loss
and gradients within float rounding); models that cannot take packed sequences are refused
(check_padding_free).

dump_pplxs.py (step 2) uses the same front-end: parse_args, load_model_and_tokenizer, build_trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import transformers

from utils import (
    DataCollatorForSupervisedDataset,
    SupervisedData,
    SupervisedDataset,
    UserError,
    add_missing_special_tokens,
    fmt_share,
    make_supervised_data,
    pack_batch,
    pad_batch,
    run_cli,
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="facebook/opt-125m",  # the paper's/Stanford Alpaca's default; a hub id or a local folder
        metadata={"help": "Model to fine-tune: a Hugging Face hub id or a folder written by save_pretrained."},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={"help": "Training records: JSON list or JSONL (optionally .gz) of Alpaca records "
                          "(instruction, input, output) or chat records {\"messages\": [...]}."},
    )

    def __post_init__(self):
        if not os.path.isfile(self.data_path):
            raise UserError(f"--data_path {self.data_path}: no such file")


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
                          "checkpoint-N in --output_dir (model, optimizer, scheduler, RNG and data position)."},
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

    def __post_init__(self):
        if self.model_max_length < 1:
            raise ValueError(f"--model_max_length must be >= 1, got {self.model_max_length}")
        super().__post_init__()


# ----------------------------------------------------------------------------------------
# Flags of the paper's command that transformers 5 removed or renamed

RENAMED_FLAGS = {  # old flag -> current flag (the value, if any, is kept)
    "evaluation_strategy": "eval_strategy",  # removed in transformers 4.46/5.0
    "gradient_checkpointing": "activation_checkpointing",  # deprecated alias in 5.x, removed in 6
}


class LegacyFlagError(ValueError):
    """A legacy flag whose value cannot be translated (reported as a usage error, exit 2)."""


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def notice(msg: str) -> None:
    if is_main_rank():  # once per job, not once per process
        print(msg, file=sys.stderr, flush=True)


def _split_flag(tok: str) -> tuple[str | None, str | None]:
    """'--a_b=1' -> ('a_b', '1'); '--a-b' -> ('a_b', None); 'x' -> (None, None)."""
    if not tok.startswith("--") or tok == "--":
        return None, None
    name, eq, value = tok[2:].partition("=")
    return name.replace("-", "_"), (value if eq else None)


def _take_value(argv: list[str], i: int, name: str, inline: str | None) -> tuple[str, int]:
    """The value of the flag at argv[i] and the index after it ('--f v' or '--f=v')."""
    if inline is not None:
        return inline, i + 1
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise LegacyFlagError(f"--{name} expects a value")
    return argv[i + 1], i + 2


def translate_legacy_flags(argv: Sequence[str]) -> list[str]:
    """Rewrite the transformers 4.x flags of the paper's commands into their transformers 5 form,
    printing a one-line notice per flag; every other argument is returned unchanged, in order.

        >>> translate_legacy_flags(["--evaluation_strategy", "no", "--warmup_ratio=0.03", "--seed", "42"])
        ['--eval_strategy', 'no', '--warmup_steps', '0.03', '--seed', '42']

    --warmup_ratio R becomes --warmup_steps R: in 5.x a warmup_steps below 1 is a ratio and gives
    ceil(R * total_steps) steps, the 4.x formula. R must be in [0, 1) and cannot be combined with
    --warmup_steps. --fsdp_transformer_layer_cls_to_wrap X (comma-separated names allowed) becomes
    the fsdp_config key transformer_layer_cls_to_wrap, merged into --fsdp_config (inline JSON or a
    JSON file) if one is given; the merged config is passed inline."""
    argv = list(argv)
    out: list[str] = []
    warmup_ratio: str | None = None
    has_warmup_steps = False
    wrap_cls: str | None = None
    fsdp_config_pos: int | None = None  # index in `out` of the --fsdp_config value
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, inline = _split_flag(tok)
        if name in RENAMED_FLAGS:
            new = RENAMED_FLAGS[name]
            notice(f"note: --{name} is --{new} in transformers 5; using --{new}")
            out.append(f"--{new}" + (f"={inline}" if inline is not None else ""))
            i += 1
        elif name == "warmup_ratio":
            if warmup_ratio is not None:
                raise LegacyFlagError("--warmup_ratio given twice")
            warmup_ratio, i = _take_value(argv, i, name, inline)
            try:
                r = float(warmup_ratio)
            except ValueError:
                raise LegacyFlagError(f"--warmup_ratio expects a number, got {warmup_ratio!r}") from None
            if not 0.0 <= r < 1.0:
                raise LegacyFlagError(f"--warmup_ratio must be in [0, 1), got {warmup_ratio} "
                                      "(use --warmup_steps N for a number of steps)")
            notice(f"note: --warmup_ratio {warmup_ratio} is --warmup_steps {warmup_ratio} in transformers 5 "
                    "(a value below 1 is a ratio of the total steps)")
            out += ["--warmup_steps", warmup_ratio]
        elif name == "fsdp_transformer_layer_cls_to_wrap":
            if wrap_cls is not None:
                raise LegacyFlagError("--fsdp_transformer_layer_cls_to_wrap given twice")
            wrap_cls, i = _take_value(argv, i, name, inline)
        elif name == "fsdp_config":
            if fsdp_config_pos is not None:
                raise LegacyFlagError("--fsdp_config given twice")
            value, i = _take_value(argv, i, name, inline)
            out.append("--fsdp_config")
            fsdp_config_pos = len(out)
            out.append(value)
        else:
            if name == "warmup_steps":
                has_warmup_steps = True
            out.append(tok)
            i += 1
    if warmup_ratio is not None and has_warmup_steps:
        raise LegacyFlagError("give either --warmup_ratio or --warmup_steps, not both "
                              "(in transformers 5 a --warmup_steps below 1 is a ratio)")
    if wrap_cls is not None:
        names = [s.strip() for s in wrap_cls.split(",") if s.strip()]
        if not names:
            raise LegacyFlagError("--fsdp_transformer_layer_cls_to_wrap expects a class name")
        config: dict = {}
        if fsdp_config_pos is not None:
            config = _load_fsdp_config(out[fsdp_config_pos])
        old = config.pop("fsdp_transformer_layer_cls_to_wrap", None)
        old = config.pop("transformer_layer_cls_to_wrap", old)
        if old is not None and old != names and [old] != names:
            notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} overrides the fsdp_config value {old!r}")
        config["transformer_layer_cls_to_wrap"] = names
        value = json.dumps(config)
        if fsdp_config_pos is None:
            out += ["--fsdp_config", value]
        else:
            out[fsdp_config_pos] = value
        notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} is the fsdp_config key "
                f"transformer_layer_cls_to_wrap in transformers 5; using --fsdp_config '{value}'")
    return out


def _load_fsdp_config(value: str) -> dict:
    if value.lstrip().startswith("{"):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as e:
            raise LegacyFlagError(f"--fsdp_config is not valid JSON ({e})") from None
    else:
        if not os.path.isfile(value):
            raise LegacyFlagError(f"--fsdp_config {value}: no such file")
        with open(value, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise LegacyFlagError(f"--fsdp_config {value}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LegacyFlagError("--fsdp_config must be a JSON object")
    return config


# ----------------------------------------------------------------------------------------
# Running the GPU command on a CPU


def cpu_fallback(ns: argparse.Namespace) -> None:
    """Without CUDA, adjust the parsed flags in place so a GPU command runs on the CPU, with one
    warning per change: tf32 and fp16 dropped, bf16 kept as CPU autocast (needs use_cpu in
    transformers 5), FSDP dropped in favour of plain data parallel (DDP over gloo under torchrun)."""
    if hasattr(ns, "dataloader_pin_memory"):
        ns.dataloader_pin_memory = False  # pinning has no effect (and warns) without an accelerator
    if getattr(ns, "tf32", None):
        notice("warning: no GPU: --tf32 dropped (TF32 is a CUDA matmul mode)")
        ns.tf32 = None
    for flag in ("fp16", "fp16_full_eval"):
        if getattr(ns, flag, False):
            notice(f"warning: no GPU: --{flag} dropped (float16 mixed precision needs CUDA); computing in float32")
            setattr(ns, flag, False)
    bf16 = getattr(ns, "bf16", False) or getattr(ns, "bf16_full_eval", False)
    if bf16 and not getattr(ns, "use_cpu", False):  # transformers 5 accepts bf16 without CUDA only with use_cpu
        notice("warning: no GPU: --bf16 runs as bfloat16 autocast on the CPU (--use_cpu True)")
        ns.use_cpu = True
    if getattr(ns, "fsdp", None) not in (None, "", False):
        notice(f"warning: no GPU: --fsdp {ns.fsdp!r} dropped, falling back to plain data parallel "
                "(DDP over gloo when launched by torchrun)")
        ns.fsdp = None
        ns.fsdp_config = None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(extra_dataclasses: Sequence[type] = (), description: str | None = None):
    return transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, *extra_dataclasses),
        description=__doc__ if description is None else description,
        formatter_class=_HelpFormatter,
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


# ----------------------------------------------------------------------------------------
# Model, data, trainer


def load_model_and_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    """Load the causal LM in float32 (the Trainer applies bf16 autocast) and its tokenizer (right
    padding, model_max_length), then add the missing special tokens as the paper does (a "[PAD]"
    token whose embedding rows are the mean of the others). Returns (model, tokenizer)."""
    import torch

    path = model_args.model_name_or_path
    if path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"--model_name_or_path {path}: no such model folder")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, cache_dir=training_args.cache_dir, model_max_length=training_args.model_max_length,
            padding_side="right",
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, cache_dir=training_args.cache_dir, dtype=torch.float32
        )
    except OSError as e:
        raise UserError(f"--model_name_or_path {path}: cannot load the model or tokenizer ({e})") from None
    add_missing_special_tokens(tokenizer, model)
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if n_pos is not None and training_args.model_max_length > n_pos:
        notice(f"warning: --model_max_length {training_args.model_max_length} exceeds the model's "
                f"max_position_embeddings {n_pos}; long records may fail or degrade")
    return model, tokenizer


def check_padding_free(model) -> None:
    """Raise a UserError unless ``model`` gives the same outputs on two records packed into one row
    (utils.pack_batch) as on the same records right-padded (utils.pad_batch). Decided by running it,
    not from a list: models whose attention ignores position-id packing, or whose absolute position
    embeddings do not restart (OPT, GPT-2), fail. One no-grad forward of 12 tokens each way, in eval
    mode (restored afterwards); a flash-attention model is probed with sdpa (the same position ids
    drive both), and a model whose weights are not materialised (meta device) is not probed."""
    import torch

    params = list(model.parameters())
    if not params or any(p.is_meta for p in params):
        return
    device, dtype = params[0].device, params[0].dtype
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    recs = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (7, 5)]
    ids, _, att = pad_batch(recs, recs, 0)
    flat, _, pos = pack_batch(recs, recs)
    name = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')})"
    impl = getattr(model.config, "_attn_implementation", None)
    probe_impl = "sdpa" if impl and "flash" in impl else impl
    was_training = model.training
    model.eval()
    try:
        if probe_impl != impl:
            model.set_attn_implementation(probe_impl)
        with torch.no_grad():
            padded = model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False).logits
            packed = model(input_ids=flat.to(device), position_ids=pos.to(device), use_cache=False).logits
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"--padding_free: {name} cannot take packed sequences ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); drop --padding_free") from None
    finally:
        if probe_impl != impl:
            model.set_attn_implementation(impl)
        model.train(was_training)
    ref = torch.cat([padded[i, : len(r)] for i, r in enumerate(recs)]).float()
    diff = float((packed[0].float() - ref).abs().max())
    tol = (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, float(ref.abs().max()))
    if not diff <= tol:
        raise UserError(f"--padding_free: {name} computes other outputs for records packed into one row than "
                        f"for the padded batch (largest logit difference {diff:.3g}): its attention or position "
                        "embeddings do not follow position-id packing; drop --padding_free")


def build_trainer(model, tokenizer, train_data: SupervisedData, training_args: TrainingArguments,
                  callbacks: Sequence = ()) -> transformers.Trainer:
    """A Trainer over the tokenized records (no eval set): right-padded batches with the tokenizer's pad
    id, or with --padding_free each batch packed into one row (after check_padding_free)."""
    padding_free = getattr(training_args, "padding_free", False)
    if padding_free:
        check_padding_free(model)
    return transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=SupervisedDataset(train_data),
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id, padding_free=padding_free),
        processing_class=tokenizer,
        callbacks=list(callbacks) or None,
    )


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, or "last"/"true" for the newest
    checkpoint-N in --output_dir. Returns the folder (or None)."""
    value = training_args.resume_from_checkpoint
    if value is None or value == "":
        return None
    if str(value).lower() in ("last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {training_args.output_dir}")
        return last
    if not os.path.isdir(value):
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def warn_truncated(data: SupervisedData, model_max_length: int) -> None:
    n = data.n_fully_truncated
    if n == len(data):
        raise UserError(f"every record's response is truncated away at --model_max_length {model_max_length}; "
                        "raise it")
    if n:
        notice(f"warning: {fmt_share(n, len(data))} have no response token within --model_max_length "
                f"{model_max_length} (prompt fills the window); they contribute nothing to training")


def fit(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, prepare=None):
    """The training both scripts share: load, tokenize, train (resuming if asked), save model, tokenizer
    and trainer_state.json to --output_dir. ``prepare(trainer, data, tokenizer)`` runs just before
    training (dump_pplxs.py adds its perplexity callback there). Returns the trainer."""
    resume = resolve_resume(training_args)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    data = make_supervised_data(data_args.data_path, tokenizer, training_args.model_max_length)
    warn_truncated(data, training_args.model_max_length)
    trainer = build_trainer(model, tokenizer, data, training_args)
    if prepare is not None:
        prepare(trainer, data, tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()  # trainer_state.json, world process zero only
    trainer.save_model(training_args.output_dir)  # gathers FSDP shards; writes from the main process only
    return trainer


def main(args=None):
    if args is None or isinstance(args, (list, tuple)) and (not args or isinstance(args[0], str)):
        args = parse_args(args)
    return fit(*args[:3])

if __name__ == "__main__":
    sys.exit(run_cli(main))
