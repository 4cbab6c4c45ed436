"""Tiny models of today's families, built locally from configs, with tokenizers that reproduce each
family's behaviour (no download). ``make_family(name, root)`` writes a folder loadable with
``--model_name_or_path``; ``FAMILIES`` lists the names.

| family  | tokenizer                                                      | special tokens                     | model |
|---------|----------------------------------------------------------------|------------------------------------|-------|
| llama2  | SentencePiece BPE, prefix space, byte fallback; ONLY tokenizer.model in the folder | bos <s>, eos </s>, unk, no pad | Llama |
| mistral | the same SentencePiece model, saved as tokenizer.json          | bos <s>, eos </s>, unk, no pad     | Mistral |
| llama3  | byte-level BPE, Llama-3 pre-tokenizer regex, Llama-3-like chat template (no generation tag) | bos <|begin_of_text|>, eos <|end_of_text|>, no pad/unk | Llama |
| qwen2   | byte-level BPE, Qwen2 regex, ChatML template with {% generation %} | eos <|im_end|>, pad <|endoftext|>, no bos/unk | Qwen2, tied, rows padded past the tokenizer |
| gemma   | SentencePiece-style BPE without prefix space (Metaspace, never) | <pad> <eos> <bos> <unk>           | Gemma (tied) |
| phi     | byte-level BPE, GPT-2 regex                                    | bos = eos = unk <|endoftext|>, no pad | Phi, rows padded past the tokenizer |
| gpt2    | byte-level BPE, GPT-2 regex                                    | bos = eos = unk <|endoftext|>, no pad | GPT-2, tied |
| opt     | examples/make_tiny_models.py's byte-level BPE                  | bos = eos </s>, unk, no pad        | OPT |
"""

from __future__ import annotations

import json
import os

from small2large import models
from tests.conftest import TINY_RECORDS

FAMILIES = ("llama2", "mistral", "llama3", "qwen2", "gemma", "phi", "gpt2", "opt")

# Pre-tokenizer regexes (facts from the released tokenizer.json files).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# A ChatML template (Qwen2.5-like) that marks the assistant's generations, end-of-turn marker included.
CHATML_GENERATION_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A Llama-3-like template: no generation tag, content trimmed, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Give the capital of France."},
                  {"role": "assistant", "content": "Paris"},
                  {"role": "user", "content": "Reverse the word planet."},
                  {"role": "assistant", "content": "tenalp, the word reversed."}]},
    {"messages": [{"role": "user", "content": "What is 7 times 8?"}, {"role": "assistant", "content": "56"}]},
    {"messages": [{"role": "user", "content": "Write a short sentence about the sea."},
                  {"role": "assistant", "content": "The sea is wide: deep, and always moving."}]},
]


def corpus(records=TINY_RECORDS) -> list[str]:
    from small2large.rendering import alpaca_to_messages, format_prompt

    texts = [format_prompt(r) + r["output"] for r in records]
    texts += [m["content"] for r in records for m in alpaca_to_messages(r)]
    texts += [m["content"] for r in CHAT_RECORDS for m in r["messages"]]
    return texts * 4


def _bpe(texts, vocab_size, specials, pre_tokenizer, decoder, normalizer=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=normalizer is not None))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if normalizer is None else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _byte_level(texts, vocab_size, specials, regex=None):
    """Byte-level BPE: with ``regex`` a Split pre-tokenizer (Llama-3 / Qwen2), else GPT-2's."""
    from tokenizers import Regex, decoders, pre_tokenizers

    if regex is None:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bpe(texts, vocab_size, specials, pre, decoders.ByteLevel())


def _with_bos(tok, bos):
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _fast(tok, out_dir, chat_template=None, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def train_sentencepiece(texts, out_dir: str, vocab_size: int = 400) -> str:
    """A Llama-2-style SentencePiece model (BPE, byte fallback, dummy prefix, identity normalisation,
    <unk>=0 <s>=1 </s>=2): writes out_dir/tokenizer.model and returns its path."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, add_dummy_prefix=True, minloglevel=2,
        allow_whitespace_only_pieces=True)
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def make_tokenizer(name: str, out_dir: str, texts=None):
    """Write the family's tokenizer into ``out_dir``; returns it loaded as a user would load it."""
    from tokenizers import decoders, normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    texts = corpus() if texts is None else texts
    os.makedirs(out_dir, exist_ok=True)
    if name in ("llama2", "mistral"):
        train_sentencepiece(texts, out_dir)

        tok = models.load_tokenizer(out_dir)  # the SentencePiece-only folder, read as Llama's tokenizer
        if name == "mistral":
            os.remove(os.path.join(out_dir, "tokenizer.model"))
            tok.save_pretrained(out_dir)
        return tok if name == "llama2" else AutoTokenizer.from_pretrained(out_dir)
    if name == "llama3":
        sp = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = _with_bos(_byte_level(texts, 600, sp, LLAMA3_REGEX), "<|begin_of_text|>")
        _fast(tok, out_dir, LLAMA3_TEMPLATE, bos_token=sp[0], eos_token=sp[1])
    elif name == "qwen2":
        sp = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _byte_level(texts, 600, sp, QWEN2_REGEX)
        _fast(tok, out_dir, CHATML_GENERATION_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    elif name == "gemma":
        sp = ["<pad>", "<eos>", "<bos>", "<unk>"]
        tok = _bpe(texts, 300, sp, pre_tokenizers.Metaspace(prepend_scheme="never", split=False),
                   decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
                   normalizer=normalizers.Replace(" ", "▁"))
        tok.pre_tokenizer = None
        _fast(_with_bos(tok, "<bos>"), out_dir, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
              unk_token="<unk>")
    elif name in ("phi", "gpt2"):
        e = "<|endoftext|>"
        _fast(_byte_level(texts, 400, [e]), out_dir, bos_token=e, eos_token=e, unk_token=e)
    elif name == "opt":
        from examples.make_tiny_models import train_bpe_tokenizer

        return train_bpe_tokenizer(texts, 300, out_dir, arch="opt")
    else:
        raise ValueError(f"unknown family {name!r}")
    return AutoTokenizer.from_pretrained(out_dir)


def make_family(name: str, root: str, hidden: int = 32, layers: int = 1, seed: int = 0) -> str:
    """Write a tiny random-initialised model of family ``name`` with its tokenizer to root/name."""
    import torch
    import transformers as tf

    out = os.path.join(root, name)
    tok = make_tokenizer(name, out)
    n = len(tok)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
                  max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if name in ("llama2", "llama3"):
        cfg = tf.LlamaConfig(vocab_size=n, num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif name == "mistral":
        cfg = tf.MistralConfig(vocab_size=n, num_key_value_heads=1, sliding_window=None, **common)
    elif name == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=(n // 64 + 2) * 64, num_key_value_heads=1, tie_word_embeddings=True, **common)
    elif name == "gemma":
        cfg = tf.GemmaConfig(vocab_size=n, num_key_value_heads=1, head_dim=16, **common)
    elif name == "phi":
        cfg = tf.PhiConfig(vocab_size=n + 100, num_key_value_heads=2, partial_rotary_factor=0.5, **common)
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=n, n_embd=hidden, n_layer=layers, n_head=2, n_positions=512,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif name == "opt":
        cfg = tf.OPTConfig(vocab_size=n, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, word_embed_proj_dim=hidden, max_position_embeddings=512,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    else:
        raise ValueError(f"unknown family {name!r}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    if name != "llama2":
        tok.save_pretrained(out)
    else:  # keep the folder SentencePiece-only: tokenizer.model, config.json, weights
        with open(os.path.join(out, "config.json")) as f:
            assert "vocab_size" in json.load(f)
    return out
