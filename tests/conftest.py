"""Shared fixtures: repo root on sys.path, offline hub, the paper's files, tiny local models."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is as fast and far more robust on a busy 2-core machine (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The paper's released files (tests marked `paper`); SMALL2LARGE_PAPER_DIR points elsewhere. CI sets
# SMALL2LARGE_REQUIRE_PAPER=1 (.ci/run): then a missing folder fails those tests instead of skipping them.
PAPER_DIR = os.path.abspath(os.environ.get("SMALL2LARGE_PAPER_DIR") or os.path.join(ROOT, "..", "shared", "paper"))
REQUIRE_PAPER = os.environ.get("SMALL2LARGE_REQUIRE_PAPER", "0") not in ("", "0")
# Tests marked `gpu` are skipped without CUDA; SMALL2LARGE_REQUIRE_GPU=1 (on a GPU machine) refuses to skip them.
REQUIRE_GPU = os.environ.get("SMALL2LARGE_REQUIRE_GPU", "0") not in ("", "0")

# A small corpus in Alpaca format: varied lengths, with and without input.
TINY_RECORDS = [
    {"instruction": "Reverse the word.", "input": "planet", "output": "tenalp"},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "Write a short sentence about the sea.", "input": "",
     "output": "The sea is wide, deep and always moving under the wind."},
    {"instruction": "Count the letters.", "input": "banana", "output": "6"},
    {"instruction": "Sort the list.", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": "Translate to upper case.", "input": "quiet morning", "output": "QUIET MORNING"},
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris"},
    {"instruction": "Convert 3 kilometres to metres.", "input": "", "output": "3000 metres"},
    {"instruction": "Summarise the text.", "input": "Cats sleep a lot. They also like to play at night.",
     "output": "Cats sleep often and play at night."},
    {"instruction": "Repeat the phrase twice.", "input": "go team", "output": "go team go team"},
    {"instruction": "What is 7 times 8?", "input": "", "output": "56"},
]


@pytest.fixture(scope="session")
def paper_dir():
    if not os.path.isdir(PAPER_DIR):
        if REQUIRE_PAPER:
            pytest.fail(f"the paper's released files are not at {PAPER_DIR}, and SMALL2LARGE_REQUIRE_PAPER=1 "
                        "requires them (set SMALL2LARGE_PAPER_DIR to where they are)", pytrace=False)
        pytest.skip(f"the paper's released files are not at {PAPER_DIR} (download them to run this test)")
    return PAPER_DIR


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, when torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    if REQUIRE_GPU:
        raise pytest.UsageError(f"SMALL2LARGE_REQUIRE_GPU=1 but torch.cuda.is_available() is False "
                                f"({len(gpu_items)} tests are marked gpu)")
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, and torch.cuda.is_available() is False")
    for item in gpu_items:
        item.add_marker(skip)


def _make_model(root, arch, hidden_size=32, num_layers=2):
    from examples.make_tiny_models import corpus, train_bpe_tokenizer, write_tiny_model

    tok_dir = os.path.join(root, f"{arch}-tok")
    tokenizer = train_bpe_tokenizer(corpus(TINY_RECORDS) * 4, 300, tok_dir, arch=arch)
    out = os.path.join(root, f"tiny-{arch}")
    write_tiny_model(out, tokenizer, arch=arch, hidden_size=hidden_size, num_layers=num_layers, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folder of a random-initialised 2-layer Llama (hidden 32) with a BPE tokenizer and no pad token."""
    return _make_model(str(tmp_path_factory.mktemp("models")), "llama")


@pytest.fixture(scope="session")
def tiny_llama_zero_loss(tiny_llama, tmp_path_factory):
    """tiny_llama edited so that after the token "." the model predicts eos with probability exactly 1.0 in
    float32: "." gets the embedding 100 * e_0 (the RMS norms then map its hidden state to ~sqrt(d) * e_0) and
    only eos's output row has a weight on dimension 0 (8, a logit of ~45 against ~0: exp(-45) vanishes
    against 1 in float32). Every record whose response ends in "." has a token loss of exactly 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    dot, eos = tok.convert_tokens_to_ids("."), tok.eos_token_id
    assert dot != tok.unk_token_id
    with torch.no_grad():
        emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[dot] = 0.0
        emb[dot, 0] = 100.0
        out[:, 0] = 0.0
        out[eos, 0] = 8.0
    path = str(tmp_path_factory.mktemp("models") / "tiny-llama-zero-loss")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """Folder of a random-initialised 2-layer OPT (hidden 32) with a BPE tokenizer and no pad token."""
    return _make_model(str(tmp_path_factory.mktemp("models")), "opt")


@pytest.fixture()
def tiny_dataset(tmp_path):
    """TINY_RECORDS written as the paper's JSON list; returns the path."""
    import json

    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY_RECORDS, indent=4))
    return str(p)
