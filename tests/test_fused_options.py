"""The fused and compiled options on the CPU (issue 17; their GPU twins are in tests/test_gpu_fused.py):

- --torch_compile with token-budget micro-batches gives the per-step losses of the paper's padded
  micro-batches in float32 (the real Trainer, the same records and steps; bench/bench_packing.py);
- --use_liger_kernel without liger-kernel is a one-line usage error, before anything is loaded;
- bench/bench_packing.py undoes liger-kernel's module-wide patches of transformers' Llama after each path;
- bench/profiling.py sums kernel time by kind and leaves out GPU-side user annotations;
- bench/bench_dump_pplxs.py times dump_pplxs.py's epochs.
"""

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch

import train
from bench import bench_dump_pplxs, bench_packing, profiling
from tests.conftest import ROOT


@pytest.mark.slow
def test_compiled_budget_training_equals_the_padded_path(tmp_path):
    out = tmp_path / "compile.json"
    bench_packing.main(["--steps", "2", "--warmup", "1", "--packed_attn", "sdpa+compile", "--json", str(out)])
    padded, compiled = json.loads(out.read_text())["results"]
    assert compiled["name"] == "packed sdpa+compile" and compiled["micro_batches"] == 1.0
    assert compiled["compiled_graphs"] > 0 and padded["compiled_graphs"] == 0   # compile ran, and only there
    assert len(compiled["losses"]) == len(padded["losses"]) == 3
    for x, y in zip(compiled["losses"], padded["losses"]):
        assert abs(x - y) <= 1e-5 * abs(y)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_use_liger_kernel_without_liger_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model_name_or_path", "m", "--data_path", os.path.join(ROOT, "data", "sample_train.json"),
                          "--output_dir", str(tmp_path), "--use_liger_kernel", "True"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--use_liger_kernel: liger-kernel is not installed" in err and "requirements-gpu.txt" in err


def test_llama_patches_are_restored_after_a_path():
    from transformers.models.llama import modeling_llama as m

    norm, forward, rope = m.LlamaRMSNorm, m.LlamaForCausalLM.forward, m.apply_rotary_pos_emb
    with bench_packing.llama_patches_restored():  # what liger's apply_liger_kernel_to_llama does
        m.LlamaRMSNorm = torch.nn.Identity
        m.apply_rotary_pos_emb = None
        m.LlamaForCausalLM.forward = lambda self, **kw: None
        m.liger_extra = 1
    assert m.LlamaRMSNorm is norm and m.apply_rotary_pos_emb is rope and m.LlamaForCausalLM.forward is forward
    assert not hasattr(m, "liger_extra")


def test_profile_summary_by_kind_without_annotations():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, us, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    prof = SimpleNamespace(events=lambda: [
        ev("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 6000), ev("pytorch_flash::flash_fwd_kernel", 2000),
        ev("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 1000), ev("vectorized_elementwise_kernel<add>", 500),
        ev("Optimizer.step#AdamW.step", 1000, annotation=True), ev("aten::mm", 9000, device=cpu)])
    p = profiling.summarize_profile(prof, wall=0.020, steps=2)   # 20 ms over 2 steps
    assert p["wall_ms"] == 10.0 and p["busy_ms"] == 4.75 and p["idle_ms"] == 5.25
    assert p["kinds_ms"]["matmul"] == 3.0 and p["kinds_ms"]["attention"] == 1.0
    assert p["kinds_ms"]["optimizer"] == 0.5 and p["kinds_ms"]["elementwise"] == 0.25


def test_bench_dump_pplxs_times_the_epochs(tmp_path):
    out = tmp_path / "dump.json"
    res = bench_dump_pplxs.main(["--data", os.path.join(ROOT, "data", "sample_train.json"), "--n_records", "64",
                                 "--epochs", "2", "--json", str(out), "--",
                                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                                 "--model_max_length", "128", "--max_tokens_per_micro_batch", "2048"])
    assert json.loads(out.read_text()) == res
    assert len(res["epoch_train_s"]) == 2 and all(0 < s < res["total_s"] for s in res["epoch_train_s"])
    assert res["records"] == 64 and res["tokens"] > 64
    assert (res["peak_flops"] is None) == (not torch.cuda.is_available())   # the MFU denominator on a GPU only


def test_gpu_table_reads_every_benchmarks_json(tmp_path):
    """bench/gpu.sh's one table: training rows with the ratio to the padded path of the same run, scoring rows
    (the paper's loop only where it ran), dump_pplxs.py epochs; "–" for what a CPU does not measure."""
    from bench import bench_pplx, gpu_table

    train_json = {"args": {"hidden": 2048, "layers": 22, "vocab": 32000, "batch": 4, "accum": 8}, "results": [
        {"name": "padded", "tokens_per_s": 4000.0, "mfu": 0.03, "padding": 0.41, "peak_gib": 24.0},
        {"name": "packed torch_varlen+liger", "tokens_per_s": 46000.0, "mfu": 0.351, "padding": 0.0, "peak_gib": 26.8}]}
    (tmp_path / "bench-1.1b.json").write_text(json.dumps(train_json))
    data = os.path.join(ROOT, "data", "sample_train.json")
    bench_pplx.main(["--data", data, "--n_records", "30", "--vocab_size", "500", "--packed", "--skip_paper",
                     "--json", str(tmp_path / "pplx-2.json")])
    (tmp_path / "dump-1.json").write_text(json.dumps({"shape": "smollm2-1.7b", "records": 2000, "tokens": 225000,
                                                      "epoch_train_s": [9.0], "mfu": [0.293], "flags": ["--bf16", "True"]}))
    rows = gpu_table.table(str(tmp_path)).splitlines()
    assert rows[0].startswith("| what | path | record tokens/s | ratio | MFU |") and len(rows) == 2 + 2 + 1 + 1
    assert "| packed torch_varlen+liger | 46,000 | 11.50x | 35.1% | 0.0% | 26.8 |" in rows[3]
    assert "| packed, sdpa |" in rows[4] and "| – |" in rows[4]   # no MFU on a CPU, no paper's loop row
    assert rows[5].startswith("| dump_pplxs.py epoch 1, smollm2-1.7b, 2000 records: 9.0 s of training | --bf16 True | 25,000 |")
