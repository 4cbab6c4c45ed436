"""GPU checks (marked gpu: skipped, with the reason, when torch sees no CUDA device; see conftest.py).
On a GPU machine: `SMALL2LARGE_REQUIRE_GPU=1 python -m pytest -q -m gpu` runs them and refuses to skip.

- step 1: the sentence embeddings on CUDA equal the CPU's;
- step 2: perplexity scoring on CUDA equals the independent one-record CPU reference in float32, stays
  within TF32's precision with --tf32 (matmuls in TF32), and is faster than the paper's loop on the GPU.
(bf16 scoring and FSDP through the Trainer are tested with the scoring engine, tests/test_scoring.py and
tests/test_distributed.py.)
"""

import os

import numpy as np
import pytest
import torch

from small2large import embedding
from tests._dump_pplxs_helpers import load, max_rel_diff, reference_pplxs
from tests.conftest import ROOT, TINY_RECORDS

pytestmark = pytest.mark.gpu


def test_embeddings_on_cuda_equal_the_cpus():

    records = TINY_RECORDS + [{"instruction": "Continue.", "input": "lantern river " * 200, "output": "stone " * 50}]
    sentences = [embedding.embed_sentence(r) for r in records]
    path = embedding.default_model_path()
    cpu = embedding.embed(sentences, path, 32, 256, "cpu")
    gpu = embedding.embed(sentences, path, 32, 256, "cuda")
    assert gpu.shape == cpu.shape == (len(records), 384)
    assert float(np.abs(gpu - cpu).max()) < 1e-4


def test_scoring_on_cuda_equals_the_cpu_reference_fp32_and_tf32(tiny_llama):
    from small2large.rendering import SupervisedData, tokenize_records
    from small2large.scoring import score_pplxs

    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS * 3, tok, 256))
    ref = reference_pplxs(model, data.input_ids, data.labels)   # CPU, one record at a time, float32
    model.cuda()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=32768, progress=False)
        assert stats.n_batches == 1 and max_rel_diff(fp32, ref) < 1e-4
        torch.backends.cuda.matmul.allow_tf32 = True   # what --tf32 True sets
        tf32, _ = score_pplxs(model, data, tok.pad_token_id, max_tokens=32768, progress=False)
        assert max_rel_diff(tf32, ref) < 1e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert not model.training


@pytest.mark.slow
def test_scoring_throughput_beats_the_papers_loop_on_cuda():
    """bench/bench_pplx.py on the GPU: 2000 sample records (57 tokens on average), random Llama (hidden 512,
    4 layers, 4k vocab), token budget 8192 (15 batches, 2.7% padding; the paper's loop: 500 batches of 4).
    Ours must be faster than the paper's loop (batches of 4, full logits) with the same float32 perplexities."""
    from bench import bench_pplx

    res = bench_pplx.main(["--data", os.path.join(ROOT, "data", "sample_train.json"), "--n_records", "2000",
                           "--device", "cuda", "--hidden_size", "512", "--num_layers", "4", "--num_heads", "8",
                           "--vocab_size", "4000", "--max_tokens", "8192", "--repeats", "2"])
    assert res["max_rel_diff"] < 1e-4
    assert res["padding_ours"] < 0.05
    assert res["speedup"] > 1.5, f"scoring on the GPU is only {res['speedup']:.2f}x the paper's loop"
