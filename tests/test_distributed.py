"""The paper's step-2 command as written (legacy flags, bf16, tf32, FSDP), tiny model and data
substituted, through torchrun with 2 CPU processes (gloo): it runs, rank 0 writes every dump, and
the pre-training dump equals single-process scoring (world-size invariance)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import dump_pplxs
import manifest
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture
from tests.conftest import ROOT, TINY_RECORDS
from utils import SupervisedData, load_pplxs, tokenize_records


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def paper_command(model, data, out, dumps, nproc=2):
    """The paper's README command for dump_pplxs.py; only paths and --model_max_length substituted."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", _free_port(), "dump_pplxs.py",
            "--model_name_or_path", model, "--data_path", data, "--val_data_path", data,
            "--bf16", "True", "--output_dir", out, "--num_train_epochs", "3",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--gradient_accumulation_steps", "8", "--evaluation_strategy", "no",
            "--save_strategy", "steps", "--save_steps", "2000", "--save_total_limit", "1",
            "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03",
            "--lr_scheduler_type", "cosine", "--logging_steps", "1",
            "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
            "--tf32", "True", "--seed", "42", "--gradient_checkpointing", "True",
            "--model_max_length", "256", "--dump_dir", dumps]


@pytest.mark.slow
def test_paper_command_torchrun_two_processes(tiny_llama, tiny_dataset, tmp_path):
    dumps = str(tmp_path / "dumps")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run(paper_command(tiny_llama, tiny_dataset, str(tmp_path / "out"), dumps),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    names = ["epoch-pre.pkl", "epoch-1.pkl", "epoch-2.pkl", "epoch-3.pkl"]
    assert sorted(os.listdir(dumps)) == sorted([*names, "manifest.json"])
    m = manifest.read_manifest(dumps)  # written by rank 0 alone: one run, 2 processes
    assert m["world_size"] == 2 and sorted(m["files"]) == sorted(names)
    dumps_ = [load_pplxs(os.path.join(dumps, n)) for n in names]
    assert all(len(d) == len(TINY_RECORDS) for d in dumps_)
    assert os.path.isfile(tmp_path / "out" / "config.json")  # the trained model is saved too
    # world-size invariance: the 2-process pre-training dump (bf16 CPU autocast) equals one process
    # scoring the same batches under the same autocast
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS, tok, 256))
    one, _ = dump_pplxs.score_pplxs(model, data, tok.pad_token_id, progress=False,
                                    autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert max_rel_diff(list(dumps_[0]), one) < 1e-5
