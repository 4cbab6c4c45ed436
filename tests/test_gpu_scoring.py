"""GPU checks of step 2 (skipped without CUDA): bf16 scoring on the GPU against the float32 reference,
the GPU token budget derived from free memory, and dump_pplxs.py under FSDP with CPU offload through
the Trainer (the scoring device comes from the Trainer, not from the offloaded first parameter)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from small2large import scoring
from small2large.dumps import load_pplxs
from small2large.rendering import SupervisedData, tokenize_records
from tests._dump_pplxs_helpers import free_port, load, max_rel_diff, reference_pplxs
from tests.conftest import ROOT, TINY_RECORDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_scoring_on_gpu(tiny_llama):
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS * 3, tok, 256))
    ref = reference_pplxs(model, data.input_ids, data.labels)  # float32 on the CPU
    model.cuda()
    budget = scoring.default_token_budget(model, "cuda")
    assert budget > scoring.CPU_TOKEN_BUDGET  # derived from the free memory, not the CPU value
    for autocast in (None, lambda: torch.autocast("cuda", dtype=torch.bfloat16)):
        got, stats = scoring.score_pplxs(model, data, tok.pad_token_id, autocast=autocast, progress=False)
        assert stats.logits == "scored" and stats.max_tokens == stats.max_tokens_start == budget
        assert max_rel_diff(got, ref) < (1e-4 if autocast is None else 3e-2)
    small, _ = scoring.score_pplxs(model, data, tok.pad_token_id, progress=False, chunk_elements=1000)
    assert max_rel_diff(small, ref) < 1e-4  # chunked cross-entropy on the GPU


@pytest.mark.slow
def test_fsdp_cpu_offload_through_the_trainer(tiny_llama, tmp_path):
    """The paper's FSDP command with fsdp_config cpu_offload on every GPU of the machine: no crash at
    the first dump (device mismatch), no hang, P0 equal to the float32 reference within bf16 rounding."""
    records = TINY_RECORDS * 3 + TINY_RECORDS[:1]  # 37 records: unequal shares on 2+ GPUs
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", free_port(),
           "dump_pplxs.py", "--model_name_or_path", tiny_llama, "--data_path", str(data), "--bf16", "True",
           "--output_dir", str(tmp_path / "out"), "--dump_dir", str(tmp_path / "dumps"), "--num_train_epochs", "1",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_strategy", "no",
           "--fsdp", "full_shard auto_wrap", "--fsdp_config", '{"cpu_offload": true}',
           "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--gradient_checkpointing", "True",
           "--model_max_length", "256", "--report_to", "none", "--pplx_max_tokens", "300"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "redundant AllGather" not in r.stdout + r.stderr
    pre, one = load_pplxs(tmp_path / "dumps" / "epoch-pre.pkl"), load_pplxs(tmp_path / "dumps" / "epoch-1.pkl")
    model, tok = load(tiny_llama)
    d = SupervisedData(*tokenize_records(records, tok, 256))
    ref = reference_pplxs(model, d.input_ids, d.labels)
    assert max_rel_diff(list(pre), ref) < 3e-2
    assert np.isfinite(one).all() and one.mean() < pre.mean()
