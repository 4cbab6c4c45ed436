r"""Make tiny, random-initialised causal LMs that load like hub models, with no download.

    # the quickstart's selector (small) and target (larger), tokenizer trained on the sample data
    python examples/make_tiny_models.py --dataset data/sample_train.json --output_dir runs/models
    # a single tiny OPT model (as used by the tests)
    python examples/make_tiny_models.py --dataset data/sample_train.json --output_dir /tmp/m --arch opt \
        --names tiny --hidden_sizes 32 --num_layers 2

It trains a byte-level BPE tokenizer on the dataset's prompts and responses (no pad token, like
Llama's, so the pipeline adds "[PAD]" exactly as it does for Llama-2), then writes one folder per
model with `save_pretrained`: config.json, model.safetensors, tokenizer files. Every script then
loads it with `--model_name_or_path DIR`, the same path a user takes with meta-llama/Llama-2-7b-hf.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large.record_io import load_records
from small2large.rendering import format_prompt  # noqa: E402
from utils import run_cli  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama's tokenizer


def train_bpe_tokenizer(texts, vocab_size: int, out_dir: str, arch: str = "llama"):
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    The tokenizer prepends a bos token ("<s>" for llama, "</s>" for opt, as the real ones do),
    has eos "</s>" and no pad token. Returns the loaded transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = "<s>" if arch == "llama" else "</s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def write_tiny_model(out_dir: str, tokenizer, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                     num_heads: int = 4, max_positions: int = 1024, seed: int = 0, intermediate_size: int | None = None,
                     num_kv_heads: int | None = None, vocab_size: int | None = None, dtype=None, device=None) -> int:
    """Write a random-initialised ``arch`` ("llama" or "opt") causal LM sized for ``tokenizer``
    into ``out_dir`` (with the tokenizer). Returns the parameter count. The optional shape arguments
    (default: an MLP of 4 x hidden, as many key/value heads as heads, the tokenizer's vocabulary) and
    ``dtype`` / ``device`` (where the weights are made, e.g. bf16 on a GPU for a 1.7B model) are Llama's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_positions,
                          tie_word_embeddings=False, **common)
        with torch.device(device or "cpu"):
            model = LlamaForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=hidden_size, ffn_dim=4 * hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, word_embed_proj_dim=hidden_size,
                        max_position_embeddings=max_positions, pad_token_id=None, **common)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def corpus(records) -> list[str]:
    """The texts the tokenizer learns from: each record's prompt and its response."""
    return [format_prompt(r) + r["output"] for r in records]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="data/sample_train.json", help="records to train the tokenizer on")
    p.add_argument("--output_dir", default="runs/models", help="one sub-folder per model is written here")
    p.add_argument("--arch", choices=["llama", "opt"], default="llama", help="model architecture")
    p.add_argument("--names", nargs="+", default=["selector", "target"], help="sub-folder name of each model")
    p.add_argument("--hidden_sizes", nargs="+", type=int, default=[64, 160], help="hidden size of each model")
    p.add_argument("--num_layers", nargs="+", type=int, default=[2, 4], help="decoder layers of each model")
    p.add_argument("--vocab_size", type=int, default=2000, help="BPE vocabulary size (tokens; ~2k for the sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = p.parse_args(argv)
    n = len(args.names)
    if len(args.hidden_sizes) != n:
        p.error("--hidden_sizes needs one value per name")
    if len(args.num_layers) == 1:
        args.num_layers = args.num_layers * n
    if len(args.num_layers) != n:
        p.error("--num_layers needs one value per name (or a single value)")
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    import tempfile

    records = load_records(args.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer(corpus(records), args.vocab_size, tmp, arch=args.arch)
    for name, h, nl in zip(args.names, args.hidden_sizes, args.num_layers):
        out = os.path.join(args.output_dir, name)
        n = write_tiny_model(out, tokenizer, arch=args.arch, hidden_size=h, num_layers=nl, seed=args.seed)
        print(f"{out}: {args.arch}, hidden {h}, {nl} layers, {n / 1e6:.2f}M parameters, vocab {len(tokenizer)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
