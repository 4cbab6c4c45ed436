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

    # continue an interrupted run from its newest complete checkpoint in --output_dir (or give a checkpoint
    # folder); a checkpoint left half-written by a kill is skipped with a note (checkpoint_problem)
    python train.py ... --resume_from_checkpoint last

Records are Alpaca records (instruction, input, output) or chat records {"messages": [...]} (ShareGPT
"conversations" too), in any format data.py reads: JSON list, JSONL, Parquet, .gz of JSON/JSONL, a
datasets.save_to_disk folder or a hub dataset id (':SPLIT'); --instruction_field, --input_field,
--output_field and --messages_field map other column names. Alpaca records are formatted with the
Stanford Alpaca prompt and only the response tokens (+ eos) are trained on; chat records are rendered
with the tokenizer's chat template (or the built-in one) and only the assistant turns (+ end-of-turn
marker) are trained on (rendering.py; --chat_template, --response_boundary, --alpaca_as_chat). The
model, tokenizer and trainer_state.json are written to --output_dir; with --lora_r the LoRA adapter (and, with
--merge_lora True, the merged model in {output_dir}/merged). load_adapted loads such an adapter folder
as a model (its base, as training loaded it, plus the adapter): --merge_lora and evaluate.py use it.

Flags from transformers 4.x that 5.x removed are rewritten with a one-line notice
(translate_legacy_flags): --evaluation_strategy -> --eval_strategy, --warmup_ratio R ->
--warmup_steps R (a float below 1 is a ratio of the total steps in 5.x, rounded up as before),
--fsdp_transformer_layer_cls_to_wrap X -> --fsdp_config '{"transformer_layer_cls_to_wrap": ["X"]}'
(merged into any --fsdp_config given), and the deprecated --gradient_checkpointing ->
--activation_checkpointing, or under --fsdp the fsdp_config key activation_checkpointing (FSDP's
own, without the Trainer's redundant all-gather in the backward). On a machine without CUDA the
same command runs on the CPU: --tf32 and --fp16 are dropped with a warning, --bf16 becomes CPU
bfloat16 autocast, --fsdp is dropped ("falling back to plain data parallel": DDP over gloo when
launched by torchrun; --use_cpu is set under torchrun so the processes really train data parallel).

--padding_free packs each batch's records into one row (same records, same order, no padding; same loss
and gradients within float rounding); models that cannot take packed sequences are refused
(check_padding_free).

dump_pplxs.py (step 2) uses the same front-end: parse_args (with its own dataclass added), then fit
(load, tokenize, train, save; its perplexity callback added through ``prepare``) or, with --score_only,
setup (load and tokenize, the Trainer built, nothing trained).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import transformers

import data
from rendering import BOUNDARIES, CHAT_TEMPLATES
from utils import (
    DataCollatorForSupervisedDataset,
    HelpFormatter,
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
        metadata={"help": "Model to fine-tune: a Hugging Face hub id or a folder written by save_pretrained "
                          "(a folder with only a SentencePiece tokenizer.model is read as Llama-2's tokenizer)."},
    )
    pad_embeddings_to_multiple_of: int = field(
        default=1,  # rows; 1 = exactly len(tokenizer), the paper's numbers; 64 suits GPU matmuls
        metadata={"help": "When a pad (or eos) token is added and does not fit in the embedding matrix, grow it "
                          "to a multiple of this many rows. 1 (default, the paper): exactly len(tokenizer) rows; "
                          "64: tensor-core friendly, but the extra rows take part in the softmax and change the "
                          "perplexities slightly. The matrix never shrinks."},
    )
    lora_r: int = field(
        default=0,  # rank; 0 = full fine-tuning (the paper); 8-64 typical for LoRA
        metadata={"help": "LoRA rank: > 0 trains low-rank adapters (peft) instead of every weight; 0 (default) "
                          "is full fine-tuning as in the paper. The perplexity dumps are those of the adapted model."},
    )
    lora_alpha: float = field(
        default=16.0,  # scaling numerator; the adapter's update is scaled by lora_alpha / lora_r (often 2 x r)
        metadata={"help": "LoRA scaling: the low-rank update is multiplied by lora_alpha / lora_r."},
    )
    lora_dropout: float = field(
        default=0.05,  # probability, on the adapter's input
        metadata={"help": "Dropout on the LoRA adapters' input (0 to disable)."},
    )
    lora_target_modules: str = field(
        default="all-linear",  # peft's shorthand: every linear layer but the output head
        metadata={"help": "Modules that get adapters: 'all-linear' (every linear layer except the output head) "
                          "or comma-separated module names, e.g. 'q_proj,v_proj'."},
    )
    merge_lora: bool = field(
        default=False,  # the adapter alone is saved (a few MB)
        metadata={"help": "With --lora_r: also save the base model with the adapter merged into its weights in "
                          "{output_dir}/merged (a plain model, loadable without peft)."},
    )

    def __post_init__(self):
        if self.pad_embeddings_to_multiple_of < 1:
            raise ValueError(f"--pad_embeddings_to_multiple_of must be >= 1, got {self.pad_embeddings_to_multiple_of}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.merge_lora and not self.lora_r:
            raise ValueError("--merge_lora needs --lora_r > 0")

    def lora_config(self):
        """The peft LoraConfig of these flags (None without --lora_r)."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules.strip()
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")


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
        metadata={"help": data.FIELD_HELP["instruction"]},
    )
    input_field: str | None = field(
        default=None,  # None: "input" (Dolly on the hub: "context")
        metadata={"help": data.FIELD_HELP["input"]},
    )
    output_field: str | None = field(
        default=None,  # None: "output" (Dolly on the hub: "response")
        metadata={"help": data.FIELD_HELP["output"]},
    )
    messages_field: str | None = field(
        default=None,  # None: "messages" (a "conversations" column is read as ShareGPT)
        metadata={"help": data.FIELD_HELP["messages"]},
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
        data.check_source(self.data_path, "--data_path")

    @property
    def data_fields(self) -> data.Fields:
        return data.Fields.from_args(self)

    def render_options(self):
        from rendering import RenderOptions

        return RenderOptions(self.response_boundary, self.chat_template, self.alpaca_as_chat)


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
    fsdp = _fsdp_requested(argv)
    fsdp_extra: dict = {}  # fsdp_config keys made from legacy flags
    warmup_ratio: str | None = None
    has_warmup_steps = False
    wrap_cls: str | None = None
    fsdp_config_pos: int | None = None  # index in `out` of the --fsdp_config value
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, inline = _split_flag(tok)
        if name == "gradient_checkpointing" and fsdp:
            value, i = _optional_value(argv, i, inline)
            if _truthy(value):
                notice("note: --gradient_checkpointing under --fsdp is the fsdp_config key activation_checkpointing "
                       "(FSDP's own; the Trainer's adds a redundant all-gather in the backward)")
                fsdp_extra["activation_checkpointing"] = True
        elif name in RENAMED_FLAGS:
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
        fsdp_extra["transformer_layer_cls_to_wrap"] = names
    if fsdp_extra:
        config: dict = {}
        if fsdp_config_pos is not None:
            config = _load_fsdp_config(out[fsdp_config_pos])
        if wrap_cls is not None:
            old = config.pop("fsdp_transformer_layer_cls_to_wrap", None)
            old = config.pop("transformer_layer_cls_to_wrap", old)
            if old is not None and old != names and [old] != names:
                notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} overrides the fsdp_config value {old!r}")
        config.update(fsdp_extra)
        value = json.dumps(config)
        if fsdp_config_pos is None:
            out += ["--fsdp_config", value]
        else:
            out[fsdp_config_pos] = value
        if wrap_cls is not None:
            notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} is the fsdp_config key "
                   f"transformer_layer_cls_to_wrap in transformers 5; using --fsdp_config '{value}'")
    return out


def _optional_value(argv: list[str], i: int, inline: str | None) -> tuple[str | None, int]:
    """The value of a boolean flag at argv[i] ('--f', '--f v', '--f=v') and the index after it."""
    if inline is not None:
        return inline, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], i + 2
    return None, i + 1


def _truthy(value: str | None) -> bool:
    """A boolean flag's value as HfArgumentParser reads it (a bare flag is True)."""
    from transformers.hf_argparser import string_to_bool

    try:
        return value is None or bool(string_to_bool(value))
    except Exception:  # noqa: BLE001 - argparse reports the bad value later
        return True


def _fsdp_requested(argv: list[str]) -> bool:
    """Whether argv turns FSDP on (--fsdp with a value other than false/empty)."""
    for i, tok in enumerate(argv):
        name, inline = _split_flag(tok)
        if name == "fsdp":
            value, _ = _optional_value(argv, i, inline)
            return value is not None and value.strip().lower() not in ("", "false", "no", "0", "none")
    return False


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
    warning per change: tf32 and fp16 dropped, bf16 kept as CPU autocast, FSDP dropped in favour of
    plain data parallel (its activation checkpointing kept as --activation_checkpointing). Under
    torchrun (WORLD_SIZE > 1) or with bf16, use_cpu is set: transformers 5 accepts bf16 without CUDA
    only with it, and without it a torchrun job is not data parallel (every process trains alone on
    every record and they all write the same --output_dir)."""
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
    if bf16 and not getattr(ns, "use_cpu", False):
        notice("warning: no GPU: --bf16 runs as bfloat16 autocast on the CPU (--use_cpu True)")
        ns.use_cpu = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(ns, "use_cpu", False):
        notice("warning: no GPU: the processes train data parallel on the CPU, DDP over gloo (--use_cpu True)")
        ns.use_cpu = True
    if getattr(ns, "fsdp", None) not in (None, "", False):
        notice(f"warning: no GPU: --fsdp {ns.fsdp!r} dropped, falling back to plain data parallel "
                "(DDP over gloo when launched by torchrun)")
        config = ns.fsdp_config
        if isinstance(config, str):
            try:
                config = _load_fsdp_config(config)
            except LegacyFlagError:
                config = {}
        if isinstance(config, dict) and _truthy(str(config.get("activation_checkpointing", False))):
            notice("note: FSDP's activation checkpointing kept as --activation_checkpointing")
            ns.activation_checkpointing = True
        ns.fsdp = None
        ns.fsdp_config = None


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


# ----------------------------------------------------------------------------------------
# Model, data, trainer


def _missing_package(e: BaseException) -> str | None:
    """The package an import/conversion error asks for, if any (sentencepiece, protobuf, tiktoken...)."""
    text = str(e).lower()
    asks = isinstance(e, ImportError) or any(w in text for w in ("install", "is required", "requires"))
    for pkg in ("sentencepiece", "protobuf", "tiktoken", "tokenizers", "peft", "accelerate"):
        if pkg in text and asks:
            return pkg
    name = getattr(e, "name", None)
    return name.split(".")[0] if isinstance(e, ImportError) and name else None


def load_tokenizer(path: str, cache_dir: str | None = None, **kwargs):
    """The tokenizer of a hub id or folder. A folder holding only a SentencePiece ``tokenizer.model``
    (older Llama / Mistral repositories) is read as the paper's transformers 4 read it: Llama's
    tokenizer with a bos token and the model file's own dummy-prefix setting (transformers 5's
    AutoTokenizer would fall back to a generic tokenizer with neither). Errors are one-line UserErrors
    naming what is missing."""
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    sp_only = "tokenizer.model" in files and not ({"tokenizer.json", "tokenizer_config.json"} & files)
    try:
        if sp_only:
            from sentencepiece import sentencepiece_model_pb2
            from transformers import LlamaTokenizer

            proto = sentencepiece_model_pb2.ModelProto()
            with open(os.path.join(path, "tokenizer.model"), "rb") as f:
                proto.ParseFromString(f.read())
            return LlamaTokenizer.from_pretrained(path, add_bos_token=True, legacy=True,
                                                  add_prefix_space=proto.normalizer_spec.add_dummy_prefix, **kwargs)
        return transformers.AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to read the user's tokenizer is reported in one line
        if files and not ({"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"} & files):
            raise UserError(f"--model_name_or_path {path}: no tokenizer files in the folder (tokenizer.json, "
                            "tokenizer_config.json or tokenizer.model)") from None
        pkg = _missing_package(e)
        if pkg:
            raise UserError(f"--model_name_or_path {path}: reading its tokenizer needs the '{pkg}' package "
                            f"(pip install -r requirements.txt)") from None
        raise UserError(f"--model_name_or_path {path}: cannot load the tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_model_and_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    """Load the causal LM in float32 (the Trainer applies bf16 autocast) and its tokenizer (right
    padding and truncation, model_max_length), then add the missing special tokens as the paper does
    (a "[PAD]" token whose embedding rows are the mean of the others; utils.add_missing_special_tokens)
    and, with --lora_r, wrap the model in LoRA adapters (peft). Returns (model, tokenizer)."""
    import torch

    path = model_args.model_name_or_path
    if path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"--model_name_or_path {path}: no such model folder")
    tokenizer = load_tokenizer(path, cache_dir=training_args.cache_dir,
                               model_max_length=training_args.model_max_length, padding_side="right")
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"  # prompt masking counts from the left; a "left" config would break it
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, cache_dir=training_args.cache_dir, dtype=torch.float32
        )
    except (OSError, ValueError, ImportError) as e:
        pkg = _missing_package(e) if isinstance(e, ImportError) else None
        what = f"needs the '{pkg}' package" if pkg else f"cannot load the model ({str(e).splitlines()[0] if str(e) else e!r})"
        raise UserError(f"--model_name_or_path {path}: {what}") from None
    add_missing_special_tokens(tokenizer, model, pad_to_multiple_of=model_args.pad_embeddings_to_multiple_of
                               if model_args.pad_embeddings_to_multiple_of > 1 else None)
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if n_pos is not None and training_args.model_max_length > n_pos:
        notice(f"warning: --model_max_length {training_args.model_max_length} exceeds the model's "
                f"max_position_embeddings {n_pos}; long records may fail or degrade")
    lora = model_args.lora_config()
    if lora is not None:
        from peft import get_peft_model

        if getattr(training_args, "activation_checkpointing", False) or training_args.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"--lora_target_modules {model_args.lora_target_modules}: {e}") from None
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        notice(f"LoRA r={model_args.lora_r}: {n_train:,} trainable parameters of {n_all:,} "
               f"({100 * n_train / n_all:.2f}%)")
    return model, tokenizer


def is_adapter_folder(path: str) -> bool:
    """A folder written by train.py --lora_r: the adapter (adapter_config.json), not a whole model."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_adapted(adapter_dir: str, training_args, base: str | None = None,
                 pad_embeddings_to_multiple_of: int = 1):
    """A train.py --lora_r output folder as a model: the base model loaded as training loaded it
    (load_model_and_tokenizer: the same added [PAD] and resized embeddings, which peft saved with the
    adapter) with the adapter applied (peft.PeftModel). ``base``: the base model (default: the
    adapter_config.json's base_model_name_or_path); ``training_args`` needs cache_dir and
    model_max_length. Returns (model, tokenizer)."""
    from peft import PeftModel

    if base is None:
        try:
            with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError) as e:
            raise UserError(f"--model_name_or_path {adapter_dir}: unreadable adapter_config.json ({e})") from None
        if not base:
            raise UserError(f"--model_name_or_path {adapter_dir}: adapter_config.json names no "
                            "base_model_name_or_path")
    model, tokenizer = load_model_and_tokenizer(ModelArguments(base, pad_embeddings_to_multiple_of), training_args)
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer


def save_merged_lora(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    """--merge_lora: reload the base model as training started from it, apply the adapter saved in
    --output_dir (load_adapted), merge it into the weights and save a plain model (+ tokenizer) to
    {output_dir}/merged. Reloading works whatever wrapped the trained model (DDP, FSDP, DeepSpeed).
    Returns the folder."""
    out = os.path.join(training_args.output_dir, "merged")
    model, tokenizer = load_adapted(training_args.output_dir, training_args, model_args.model_name_or_path,
                                    model_args.pad_embeddings_to_multiple_of)
    model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    notice(f"LoRA adapter merged into the base model: {out}")
    return out


def check_padding_free(model) -> None:
    """Raise a UserError unless ``model`` gives the same outputs on two records packed into one row
    (utils.pack_batch) as on the same records right-padded (utils.pad_batch). Decided by running it,
    not from a list: models whose attention ignores position-id packing, or whose absolute position
    embeddings do not restart (OPT, GPT-2), fail. One no-grad forward of 12 tokens each way, in eval
    mode (restored afterwards); a flash-attention model is probed with sdpa (the same position ids
    drive both), and a model whose weights are not materialised is not probed: on the meta device, or
    partitioned by DeepSpeed ZeRO-3 (each rank holds a slice, the local tensors are empty; decided by
    transformers' is_deepspeed_zero3_enabled, as utils.embedding_gather)."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    params = list(model.parameters())
    if not params or any(p.is_meta for p in params) or is_deepspeed_zero3_enabled():
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


STATE_FILES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".distcp")  # never empty when whole


def _safetensors_intact(path: str) -> bool:
    """A .safetensors file is whole when its size is 8 + header + the end of its last tensor."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def checkpoint_problem(folder: str, save_only_model: bool = False, world_size: int = 1) -> str | None:
    """Why ``folder`` (a Trainer checkpoint-N) cannot be resumed from, or None when it is complete.

    transformers 5's Trainer._save_checkpoint writes, in this order: the model (save_model: weights,
    config, tokenizer, training_args.bin), the optimizer and scheduler (optimizer.pt/scheduler.pt, or
    FSDP's optimizer_0/ or DeepSpeed's global_stepN/), the scaler, the RNG state (rng_state[_R].pth,
    one per process), and trainer_state.json LAST, with plain non-atomic writes. A process killed
    during a save therefore leaves files that are missing, empty or cut short. Complete means:
    trainer_state.json parses and names step N; model weights, optimizer, scheduler and RNG state
    are present (without --save_only_model; RNG states of processes 0..world_size-1 when the checkpoint
    has one per process); and no file is empty or cut short (torch files are zip archives whose
    directory is written last; a .safetensors file's size follows from its header)."""
    import zipfile

    m = re.search(r"-(\d+)$", os.path.basename(os.path.normpath(folder)))
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable (cut short?)"
    if m and step != int(m.group(1)):
        return f"its trainer_state.json is for step {step}"
    names = set(os.listdir(folder))
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(STATE_FILES) and os.path.getsize(path) == 0:
                return f"{rel} is empty"
            if name.endswith(".safetensors") and not _safetensors_intact(path):
                return f"{rel} is cut short"
            if name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
                return f"{rel} is cut short"
    deepspeed = any(n.startswith("global_step") for n in names)
    for n in names:  # sharded (distributed checkpoint) folders: .metadata is written after the shards
        if n.startswith(("pytorch_model_fsdp", "optimizer_")) and os.path.isdir(os.path.join(folder, n)) \
                and not os.path.isfile(os.path.join(folder, n, ".metadata")):
            return f"{n}/ has no .metadata"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return f"{index} is unreadable"
            if shards - names:
                return f"{sorted(shards - names)[0]} (listed in {index}) is missing"
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
    if not (names & set(weights) or deepspeed or any(n.startswith("pytorch_model_fsdp") for n in names)):
        return "no model weights"
    if save_only_model:
        return None
    if not (deepspeed or names & {"optimizer.pt", "optimizer.bin"} or any(n.startswith("optimizer_") for n in names)):
        return "no optimizer state"
    if not deepspeed and "scheduler.pt" not in names:
        return "no scheduler.pt"
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in names):
        return "no rng_state.pth"
    if "rng_state.pth" not in names:  # one per process: a process killed before writing its own
        lost = [f"rng_state_{r}.pth" for r in range(world_size) if f"rng_state_{r}.pth" not in names]
        if lost:
            return f"no {lost[0]}"
    return None


def _checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of ``output_dir``, newest (highest N) first."""
    from transformers.trainer_utils import sort_checkpoints

    return sort_checkpoints(output_dir)[::-1] if os.path.isdir(output_dir) else []


def _newest_complete(output_dir: str, **check) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete checkpoint or None, [(newer incomplete checkpoint, why), ...])."""
    skipped = []
    for c in _checkpoints(output_dir):
        why = checkpoint_problem(c, **check)
        if why is None:
            return c, skipped
        skipped.append((c, why))
    return None, skipped


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, or "last"/"true" for the newest COMPLETE
    checkpoint-N in --output_dir (see checkpoint_problem: a run killed while saving leaves a partial
    one, which is skipped with a one-line note). An explicit incomplete checkpoint is a UserError
    naming the newest complete one. Returns the folder (or None)."""
    value = training_args.resume_from_checkpoint
    if value is None or value == "":
        return None
    check = {"save_only_model": bool(getattr(training_args, "save_only_model", False)),
             "world_size": int(os.environ.get("WORLD_SIZE", "1"))}  # the processes torchrun started
    if str(value).lower() in ("last", "true"):
        out = training_args.output_dir
        if not _checkpoints(out):
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {out}")
        last, skipped = _newest_complete(out, **check)
        gone = "; ".join(f"{os.path.basename(c)}: {why}" for c, why in skipped)
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint in {out} ({gone})")
        if skipped:
            notice(f"note: skipping incomplete {gone}; resuming from {last}")
        return last
    if not os.path.isdir(value):
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    why = checkpoint_problem(value, **check)
    if why is not None:
        newest, _ = _newest_complete(os.path.dirname(os.path.normpath(value)), **check)
        hint = f"the newest complete one is {newest}" if newest else "there is no complete checkpoint beside it"
        raise UserError(f"--resume_from_checkpoint {value} is incomplete ({why}); {hint}")
    return value


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


def fit(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, prepare=None):
    """The training both scripts share: load, tokenize, train (resuming if asked), save model, tokenizer
    and trainer_state.json to --output_dir. ``prepare(trainer, data, tokenizer)`` runs just before
    training (dump_pplxs.py adds its perplexity callback there). Returns the trainer."""
    resume = resolve_resume(training_args)
    model, tokenizer, data, trainer = setup(model_args, data_args, training_args)
    if prepare is not None:
        prepare(trainer, data, tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()  # trainer_state.json, world process zero only
    trainer.save_model(training_args.output_dir)  # gathers FSDP shards; writes from the main process only
    # (with LoRA: the adapter, adapter_config.json and adapter_model.safetensors)
    if model_args.merge_lora and trainer.is_world_process_zero():
        save_merged_lora(model_args, training_args)
    return trainer


def main(args=None):
    if args is None or isinstance(args, (list, tuple)) and (not args or isinstance(args[0], str)):
        args = parse_args(args)
    return fit(*args[:3])

if __name__ == "__main__":
    sys.exit(run_cli(main))
