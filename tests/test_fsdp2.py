"""A real FSDP2 model (fully_shard over gloo, 2 CPU processes under torchrun) scored by the project's
engine and through the dump callback with a Trainer holding the sharded model: unequal shares of
batches, yet every process makes the same number of forward calls (counted by a forward hook: gloo
can pair mismatched collectives without hanging, so finishing proves nothing), and the dumps equal
the independent one-record-at-a-time reference on the unsharded model."""

import json
import os
import subprocess
import sys

import pytest

from small2large.dumps import load_pplxs
from small2large.rendering import SupervisedData, tokenize_records
from tests._dump_pplxs_helpers import free_port, load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import ROOT, TINY_RECORDS


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


@pytest.mark.slow
def test_fsdp2_lockstep_engine_and_callback(tiny_llama, tmp_path):
    records = TINY_RECORDS * 2  # 24 records: 5 length-sorted batches at 700 tokens -> shares of 3 and 2
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(records))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "tests/_fsdp2_worker.py", tiny_llama, str(data_path), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    # really sharded: each process holds its part (dim-0 shards) of each parameter
    assert sum(k["local_shard_numel"] for k in ranks) == ranks[0]["full_numel"]
    for k in ranks:
        assert k["sharded"] == "DTensor" and k["local_shard_numel"] < k["full_numel"]
        assert not k["is_fsdp_enabled"]  # the Trainer does not know: the old "lockstep only under FSDP" missed it
    # the callback with a Trainer whose model is sharded: unequal shares, the same forward calls
    # (2 probe forwards + 3 steps, one of them a dummy on rank 1)
    assert [k["callback_calls"] for k in ranks] == [5, 5], "processes made different forward calls"
    assert [k["callback_batches"] for k in ranks] == [3, 2]
    assert [k["engine_calls"] for k in ranks] == [5, 5]  # the same with the engine called directly
    assert [k["engine_batches"] for k in ranks] == [3, 2]
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(records, tok, 256))
    ref = reference_pplxs(model, data.input_ids, data.labels)
    assert ranks[0]["engine_pplxs"] == ranks[1]["engine_pplxs"]  # gathered on every process
    assert max_rel_diff(ranks[0]["engine_pplxs"], ref) < 1e-5
    # the callback: global rank 0 alone writes, and the dump equals the reference
    assert ranks[0]["written"] == [str(out / "dumps" / "epoch-pre.pkl")] and ranks[1]["written"] == []
    assert max_rel_diff(list(load_pplxs(out / "dumps" / "epoch-pre.pkl")), ref) < 1e-5
