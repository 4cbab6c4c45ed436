"""Loading models and tokenizers as training does: ModelArguments, one tokenizer loader (a
SentencePiece-only folder is read as Llama's), the paper's added special tokens with mean-initialised
rows, LoRA adapters (peft), the padding-free check, and the device/dtype of evaluation."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

from small2large.attention import TORCH_VARLEN, is_varlen, register_torch_varlen, resolve_attn_implementation
from small2large.batching import pack_batch, pad_batch
from utils import UserError, notice

DEFAULT_PAD_TOKEN = "[PAD]"


DEFAULT_EOS_TOKEN = "</s>"


def embedding_gather(params):
    """Context manager under which the full embedding matrices can be read and written on every
    process: DeepSpeed ZeRO-3 shards them (each rank holds a slice), so they are gathered, and rank
    0's writes are broadcast on exit (``GatheredParameters(..., modifier_rank=0)``). Without ZeRO-3
    the parameters are whole already: a no-op."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
    return contextlib.nullcontext()


def _rows(weight) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape


def add_missing_special_tokens(tokenizer, model, pad_to_multiple_of: int | None = None) -> int:
    """Give the tokenizer a pad token ("[PAD]", as the paper does) when it has none, and an eos
    ("</s>") when it has none; never a bos or unk (a Qwen2.5-like tokenizer has neither, on purpose).
    Returns the number of tokens added.

    The embedding matrices never shrink: a new id that fits inside them (Qwen2.5, Phi-2: rows padded
    past the tokenizer) needs no resize; otherwise they grow to len(tokenizer) rows, rounded up to
    ``pad_to_multiple_of`` if given (the paper: exactly len(tokenizer); extra rows would take part in
    the softmax and change every perplexity). Each new token's input and output rows are set to the
    mean of the rows the tokenizer used before the addition (ids 0 .. len(tokenizer)-1; the padding
    rows past the tokenizer are left out), as the paper does -- on Llama-2 and OPT this is the mean of
    all old rows, the paper's number. A tied matrix is written once and stays tied. Under DeepSpeed
    ZeRO-3 the rows are written on gathered parameters (see embedding_gather)."""
    special: dict[str, str] = {}
    if tokenizer.pad_token is None:
        special["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special["eos_token"] = DEFAULT_EOS_TOKEN
    if not special:
        return 0
    n_before = len(tokenizer)
    num_new = tokenizer.add_special_tokens(special)
    if num_new <= 0:
        return 0
    import torch

    def weights():
        out = []
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and all(emb.weight is not w for w in out):
                out.append(emb.weight)  # a tied matrix once
        return out

    tied = len(weights()) == 1 and model.get_output_embeddings() is not None
    rows = _rows(model.get_input_embeddings().weight)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of,
                                      mean_resizing=False)  # the new rows are set to the plain mean below
    new_ids = list(range(n_before, len(tokenizer)))
    params = weights()
    with embedding_gather(params), torch.no_grad():
        for w in params:
            used = min(n_before, w.shape[0])
            w[new_ids] = w[:used].mean(dim=0, keepdim=True)
    if tied and len(weights()) != 1:
        raise RuntimeError("the input and output embeddings were tied before adding tokens and are not after")
    return num_new


def _missing_package(e: BaseException) -> str | None:
    """The package an import/conversion error asks for, if any (sentencepiece, protobuf, tiktoken...)."""
    text = str(e).lower()
    asks = isinstance(e, ImportError) or any(w in text for w in ("install", "is required", "requires"))
    for pkg in ("sentencepiece", "protobuf", "tiktoken", "tokenizers", "peft", "accelerate"):
        if pkg in text and asks:
            return pkg
    name = getattr(e, "name", None)
    return name.split(".")[0] if isinstance(e, ImportError) and name else None


def load_tokenizer(path: str, cache_dir: str | None = None, head: str | None = None, **kwargs):
    """The tokenizer of a hub id or folder. A folder holding only a SentencePiece ``tokenizer.model``
    (older Llama / Mistral repositories) is read as the paper's transformers 4 read it: Llama's
    tokenizer with a bos token and the model file's own dummy-prefix setting (transformers 5's
    AutoTokenizer would fall back to a generic tokenizer with neither). Errors are one-line UserErrors
    naming what is missing, headed by ``head`` (default "--model_name_or_path PATH")."""
    head = head or f"--model_name_or_path {path}"
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
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to read the user's tokenizer is reported in one line
        if files and not ({"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"} & files):
            raise UserError(f"{head}: no tokenizer files in the folder (tokenizer.json, "
                            "tokenizer_config.json or tokenizer.model)") from None
        pkg = _missing_package(e)
        if pkg:
            raise UserError(f"{head}: reading its tokenizer needs the '{pkg}' package "
                            f"(pip install -r requirements.txt)") from None
        raise UserError(f"{head}: cannot load the tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def attention_kwargs(model_args: ModelArguments, training_args) -> dict:
    """from_pretrained's attn_implementation for --attn_implementation (none when not given), checked
    against the packing the run uses (attention.resolve_attn_implementation: one-line errors)."""
    name = getattr(model_args, "attn_implementation", None)
    if not name:
        return {}
    import torch

    packing = bool(getattr(training_args, "max_tokens_per_micro_batch", None) or
                   getattr(training_args, "padding_free", False))
    device = "cuda" if torch.cuda.is_available() and not getattr(training_args, "use_cpu", False) else "cpu"
    impl = resolve_attn_implementation(name, packing=packing, device=device)
    if impl == TORCH_VARLEN:
        register_torch_varlen()
    return {"attn_implementation": impl}


def load_model_and_tokenizer(model_args: ModelArguments, training_args, head: str | None = None):
    """Load the causal LM in float32 (the Trainer applies bf16 autocast) and its tokenizer (right
    padding and truncation, model_max_length), then add the missing special tokens as the paper does
    (a "[PAD]" token whose embedding rows are the mean of the others; utils.add_missing_special_tokens)
    and, with --lora_r, wrap the model in LoRA adapters (peft). Returns (model, tokenizer)."""
    import torch

    path = model_args.model_name_or_path
    head = head or f"--model_name_or_path {path}"
    if path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"{head}: no such model folder")
    tokenizer = load_tokenizer(path, cache_dir=training_args.cache_dir, head=head,
                               model_max_length=training_args.model_max_length, padding_side="right")
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"  # prompt masking counts from the left; a "left" config would break it
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, cache_dir=training_args.cache_dir, dtype=torch.float32, **attention_kwargs(model_args, training_args)
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build, a corrupt weight file, ...
        pkg = _missing_package(e) if isinstance(e, ImportError) else None
        what = f"needs the '{pkg}' package" if pkg else f"cannot load the model ({str(e).splitlines()[0] if str(e) else e!r})"
        raise UserError(f"{head}: {what}") from None
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
                 pad_embeddings_to_multiple_of: int = 1, head: str | None = None):
    """A train.py --lora_r output folder as a model: the base model loaded as training loaded it
    (load_model_and_tokenizer: the same added [PAD] and resized embeddings, which peft saved with the
    adapter) with the adapter applied (peft.PeftModel). ``base``: the base model (default: the
    adapter_config.json's base_model_name_or_path); ``training_args`` needs cache_dir and
    model_max_length; ``head`` starts its error messages (default "--model_name_or_path ADAPTER_DIR").
    Returns (model, tokenizer)."""
    from peft import PeftModel

    head = head or f"--model_name_or_path {adapter_dir}"
    if base is None:
        try:
            with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
                base = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError) as e:
            raise UserError(f"{head}: unreadable adapter_config.json ({e})") from None
        if not base:
            raise UserError(f"{head}: adapter_config.json names no "
                            "base_model_name_or_path")
    model, tokenizer = load_model_and_tokenizer(ModelArguments(base, pad_embeddings_to_multiple_of=pad_embeddings_to_multiple_of),
                                                training_args, head)
    return PeftModel.from_pretrained(model, adapter_dir), tokenizer


def save_merged_lora(model_args: ModelArguments, training_args) -> str:
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
    probe_impl = "sdpa" if impl and ("flash" in impl or is_varlen(impl)) else impl  # the same position ids
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


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


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

    attn_implementation: str | None = field(
        default=None,  # None: transformers' own choice (sdpa where the model supports it), as today
        metadata={"help": "Attention kernel: sdpa, eager, flex_attention, flash_attention_2/3 (needs flash-attn), "
                          "torch_varlen (torch's own varlen flash kernel: CUDA, bf16/fp16, training and scoring "
                          "only) or auto (with packing on a GPU: flash_attention_2, else torch_varlen, else sdpa). "
                          "With --max_tokens_per_micro_batch or --padding_free a varlen kernel computes only each "
                          "record's own attention. Default: transformers' choice."},
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
