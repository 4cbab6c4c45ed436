"""GPU checks of the fused and compiled options (issue 17; marked gpu, skipped without CUDA; the liger
ones also need liger-kernel, requirements-gpu.txt):

- training: token-budget micro-batches with torch_varlen, plus --use_liger_kernel (fused RMSNorm, RoPE,
  SwiGLU and linear cross-entropy) or --torch_compile, give the per-step losses of the paper's padded
  micro-batches within bf16 rounding (bench/bench_packing.py, the real Trainer, same records and steps);
- scoring: packed scoring (the scored positions as an index, copied asynchronously) with torch_varlen
  equals the one-record float32 reference, with and without liger's kernels in the model.
"""

import importlib.util
import json

import pytest
import torch

from bench import bench_packing
from small2large import attention
from small2large.rendering import SupervisedData, tokenize_records
from small2large.scoring import score_pplxs
from tests._dump_pplxs_helpers import load, max_rel_diff, reference_pplxs
from tests.conftest import TINY_RECORDS

pytestmark = pytest.mark.gpu
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel is not installed (pip install -r requirements-gpu.txt)")


def _bench_losses(tmp_path, packed_attn: str) -> dict:
    out = tmp_path / f"{packed_attn.replace(',', '_')}.json"
    bench_packing.main(["--device", "cuda", "--bf16", "--hidden", "256", "--layers", "4", "--heads", "8",
                        "--kv_heads", "4", "--vocab", "2000", "--steps", "3", "--warmup", "1", "--max_tokens", "16384",
                        "--packed_attn", packed_attn, "--json", str(out)])
    return {r["name"]: r for r in json.loads(out.read_text())["results"]}


def _assert_same_losses(runs: dict, name: str, rel: float = 2e-2):
    want, got = runs["padded"]["losses"], runs[name]["losses"]
    assert len(got) == len(want) == 4, (name, got, want)
    for x, y in zip(got, want):
        assert abs(x - y) <= rel * abs(y), (name, got, want)


@needs_liger
def test_liger_training_matches_the_padded_path(tmp_path):
    runs = _bench_losses(tmp_path, "torch_varlen,torch_varlen+liger")
    _assert_same_losses(runs, "packed torch_varlen")
    _assert_same_losses(runs, "packed torch_varlen+liger")
    assert runs["packed torch_varlen+liger"]["micro_batches"] == 1.0
    assert runs["packed torch_varlen+liger"]["liger_modules"] > 0 and runs["packed torch_varlen"]["liger_modules"] == 0


def test_compiled_training_matches_the_padded_path(tmp_path):
    runs = _bench_losses(tmp_path, "torch_varlen+compile")
    _assert_same_losses(runs, "packed torch_varlen+compile")
    assert runs["packed torch_varlen+compile"]["compiled_graphs"] > 0 and runs["padded"]["compiled_graphs"] == 0


@pytest.mark.parametrize("liger", [False, pytest.param(True, marks=needs_liger)])
def test_packed_varlen_scoring_equals_the_reference(tiny_llama, liger):
    """With liger: its whole Llama patch, as --use_liger_kernel applies it, including its own causal-LM forward,
    which takes logits_to_keep only as positions: packed varlen scoring must still project only the scored
    positions ("scored"), not fall back to full logits."""
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS * 5, tok, 256))
    ref = reference_pplxs(model, data.input_ids, data.labels)  # float32, CPU, one record at a time
    model.cuda()
    with bench_packing.llama_patches_restored():  # liger patches transformers' Llama module itself
        if liger:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=model)  # --use_liger_kernel's defaults
            assert any(type(m).__name__.startswith("Liger") for m in model.modules())
        model.set_attn_implementation(attention.register_torch_varlen())
        with torch.autocast("cuda", dtype=torch.bfloat16):  # the varlen kernel takes bf16/fp16 only
            got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=4096, progress=False, packed=True)
    assert stats.logits == "scored" and stats.padding_share <= 0.02
    assert max_rel_diff(got, ref) < 3e-2
