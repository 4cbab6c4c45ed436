"""Preemption: what a run killed with SIGKILL leaves behind, and resuming from it.

Unit tests of train.checkpoint_problem / resolve_resume on crafted checkpoint folders, then real
processes (tests/_preempt.py) killed while the Trainer writes a checkpoint or while a dump is being
written, resumed with --resume_from_checkpoint last: the result equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dump_pplxs
import train
from small2large import checkpoints, claims, manifest
from small2large.dumps import load_pplxs
from tests._dump_pplxs_helpers import one_thread_fixture
from tests.conftest import ROOT, TINY_RECORDS
from utils import UserError

# ----------------------------------------------------------------------------------------
# What counts as a complete checkpoint


def make_checkpoint(d, step):
    """A checkpoint-STEP folder with the files transformers 5's Trainer writes (small real contents)."""
    from safetensors.torch import save_file

    c = os.path.join(d, f"checkpoint-{step}")
    os.makedirs(c)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, os.path.join(c, "model.safetensors"))
    with open(os.path.join(c, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, os.path.join(c, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(c, "scheduler.pt"))
    torch.save({"cpu": torch.random.get_rng_state()}, os.path.join(c, "rng_state.pth"))
    with open(os.path.join(c, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "epoch": step / 3}, f)
    return c


def _cut(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage, why", [
    (lambda c: os.remove(f"{c}/trainer_state.json"), "no trainer_state.json"),
    (lambda c: _cut(f"{c}/trainer_state.json"), "trainer_state.json is unreadable"),
    (lambda c: Path(c, "trainer_state.json").write_text('{"global_step": 2}'), "for step 2"),
    (lambda c: Path(c, "optimizer.pt").write_bytes(b""), "optimizer.pt is empty"),
    (lambda c: _cut(f"{c}/optimizer.pt"), "optimizer.pt is cut short"),
    (lambda c: _cut(f"{c}/rng_state.pth", 0.9), "rng_state.pth is cut short"),
    (lambda c: _cut(f"{c}/model.safetensors", 0.8), "model.safetensors is cut short"),
    (lambda c: os.remove(f"{c}/model.safetensors"), "no model weights"),
    (lambda c: os.remove(f"{c}/optimizer.pt"), "no optimizer state"),
    (lambda c: os.remove(f"{c}/scheduler.pt"), "no scheduler.pt"),
    (lambda c: os.remove(f"{c}/rng_state.pth"), "no rng_state.pth"),
    (lambda c: os.makedirs(f"{c}/pytorch_model_fsdp_0"), "pytorch_model_fsdp_0/ has no .metadata"),
    (lambda c: Path(c, "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00001-of-00002.safetensors"}}'), "model-00001-of-00002.safetensors"),
])
def test_checkpoint_problem_names_what_is_missing(tmp_path, damage, why):
    c = make_checkpoint(str(tmp_path), 4)
    assert checkpoints.checkpoint_problem(c) is None
    damage(c)
    assert why in checkpoints.checkpoint_problem(c)


def test_checkpoint_problem_save_only_model(tmp_path):
    c = make_checkpoint(str(tmp_path), 4)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        os.remove(os.path.join(c, name))
    assert checkpoints.checkpoint_problem(c, save_only_model=True) is None
    assert checkpoints.checkpoint_problem(c) == "no optimizer state"


def test_checkpoint_problem_one_rng_state_per_process(tmp_path, monkeypatch):
    """Under torchrun every process writes its own rng_state_R.pth, and rank 0 may write
    trainer_state.json before another rank has written its file."""
    c = make_checkpoint(str(tmp_path), 4)
    os.rename(os.path.join(c, "rng_state.pth"), os.path.join(c, "rng_state_0.pth"))
    assert checkpoints.checkpoint_problem(c, world_size=1) is None
    assert checkpoints.checkpoint_problem(c, world_size=2) == "no rng_state_1.pth"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="no rng_state_1.pth"):
        checkpoints.resolve_resume(_targs(tmp_path, c))
    torch.save({}, os.path.join(c, "rng_state_1.pth"))
    assert checkpoints.resolve_resume(_targs(tmp_path, c)) == c


def _targs(out, value):
    return SimpleNamespace(output_dir=str(out), resume_from_checkpoint=value, save_only_model=False)


def test_resolve_resume_skips_incomplete_checkpoints(tmp_path, capsys):
    ok = make_checkpoint(str(tmp_path), 10)
    bad = make_checkpoint(str(tmp_path), 12)
    open(os.path.join(bad, "optimizer.pt"), "w").close()  # what the kill of issue 8 left: 0 bytes ...
    os.remove(os.path.join(bad, "trainer_state.json"))  # ... and no trainer_state.json
    make_checkpoint(str(tmp_path), 2)
    assert checkpoints.resolve_resume(_targs(tmp_path, "last")) == ok
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipping incomplete checkpoint-12: no trainer_state.json" in err and ok in err
    with pytest.raises(UserError, match=r"checkpoint-12 is incomplete \(no trainer_state.json.*newest complete one is "
                                        rf"{ok}$") as e:
        checkpoints.resolve_resume(_targs(tmp_path, bad))
    assert "\n" not in str(e.value)  # one line
    assert checkpoints.resolve_resume(_targs(tmp_path, ok)) == ok
    for c in (ok, os.path.join(tmp_path, "checkpoint-2")):
        os.remove(os.path.join(c, "scheduler.pt"))
    with pytest.raises(UserError, match=r"no complete checkpoint in .*checkpoint-12: no trainer_state.json \(.*\); "
                                        "checkpoint-10: no scheduler.pt; checkpoint-2: no scheduler.pt"):
        checkpoints.resolve_resume(_targs(tmp_path, "last"))
    with pytest.raises(UserError, match="there is no complete checkpoint beside it"):
        checkpoints.resolve_resume(_targs(tmp_path, bad))


# ----------------------------------------------------------------------------------------
# Real processes killed with SIGKILL

STEPS = ["--save_strategy", "steps", "--save_steps", "2"]  # 12 records, batch 4: 3 steps per epoch


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


def _dump_argv(model, data, d, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(d / "out"),
            "--dump_dir", str(d / "dumps"), "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--model_max_length", "256", "--seed", "42", "--report_to", "none",
            "--disable_tqdm", "True", *STEPS, *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "tiny.json"
    p.write_text(json.dumps(TINY_RECORDS, indent=4))
    return str(p)


@pytest.fixture(scope="module")
def uninterrupted(tiny_opt, dataset, tmp_path_factory):
    """dump_pplxs.py run to the end without interruption (OPT has dropout: the RNG state restored on
    resume matters); returns its dump folder."""
    d = tmp_path_factory.mktemp("uninterrupted")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dump_pplxs.main(_dump_argv(tiny_opt, dataset, d))
    finally:
        torch.set_num_threads(n)
    return d / "dumps"


def run_until_hang(script, hang, argv, log, timeout=180):
    """Start tests/_preempt.py, wait until it reports that it hangs inside the save or dump, SIGKILL it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_preempt.py"), script, hang, *argv],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        t0 = time.monotonic()
        try:
            for line in p.stdout:
                if line.strip() == "HANGING":
                    break
                assert time.monotonic() - t0 < timeout
            else:
                raise AssertionError(f"the process ended without hanging: {Path(log).read_text()[-3000:]}")
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL


def _assert_dumps_equal(got_dir, ref_dir, names):
    for name in names:
        np.testing.assert_allclose(load_pplxs(got_dir / name), load_pplxs(ref_dir / name), rtol=1e-6, atol=0,
                                   err_msg=name)


def _assert_one_run(dumps, run_id, names):
    m = manifest.read_manifest(str(dumps))
    assert m["run_id"] == run_id and sorted(m["files"]) == sorted(names)
    for name in names:
        e = m["files"][name]
        assert e["run_id"] == run_id and e["sha256"] == manifest.sha256_file(dumps / name) and not e["partial"]



def _listing(folder) -> list[str]:
    """The folder's files, without the claim a killed run leaves behind (.small2large-claim.json)."""
    return sorted(f for f in os.listdir(folder) if f != claims.CLAIM_FILE)


@pytest.mark.slow
def test_dump_pplxs_killed_while_saving_a_checkpoint(tiny_opt, dataset, uninterrupted, tmp_path, capfd):
    """Killed while the Trainer writes checkpoint-4 (optimizer.pt half written, no trainer_state.json):
    `last` skips it with a note and resumes from checkpoint-2; the dumps equal an uninterrupted run's
    and the resumed run continues the same run id."""
    argv = _dump_argv(tiny_opt, dataset, tmp_path)
    run_until_hang("dump_pplxs", "save:4", argv, tmp_path / "log")
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    assert _listing(out) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert checkpoints.checkpoint_problem(str(out / "checkpoint-4")).startswith("no trainer_state.json")
    assert _listing(dumps) == ["epoch-1.pkl", "epoch-pre.pkl", "manifest.json"]  # epoch 1 ended at step 3
    run_id = manifest.read_manifest(str(dumps))["run_id"]
    _assert_one_run(dumps, run_id, ["epoch-pre.pkl", "epoch-1.pkl"])
    capfd.readouterr()
    with pytest.raises(UserError, match=rf"checkpoint-4 is incomplete .*newest complete one is {out}/checkpoint-2$"):
        dump_pplxs.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    dump_pplxs.main(argv + ["--resume_from_checkpoint", "last"])
    err = capfd.readouterr().err
    assert f"note: skipping incomplete checkpoint-4: no trainer_state.json (the Trainer writes it last: the save was " \
           f"interrupted); resuming from {out}/checkpoint-2" in err
    names = ["epoch-pre.pkl", "epoch-1.pkl", "epoch-2.pkl"]
    assert _listing(dumps) == sorted([*names, "manifest.json"])
    _assert_dumps_equal(dumps, uninterrupted, names)
    _assert_one_run(dumps, run_id, names)
    assert checkpoints.checkpoint_problem(str(out / "checkpoint-4")) is None  # written again, whole


@pytest.mark.slow
def test_dump_pplxs_killed_while_writing_a_dump(tiny_opt, dataset, uninterrupted, tmp_path, capfd):
    """Killed half-way through writing epoch-1.pkl: no cut-short dump is visible (only atomic_write's
    temporary file); resumed with `last` (checkpoint-2) the dumps equal an uninterrupted run's."""
    argv = _dump_argv(tiny_opt, dataset, tmp_path)
    run_until_hang("dump_pplxs", "dump:epoch-1.pkl", argv, tmp_path / "log")
    dumps = tmp_path / "dumps"
    visible = sorted(n for n in os.listdir(dumps) if not n.startswith("."))
    assert visible == ["epoch-pre.pkl", "manifest.json"]
    assert [n for n in os.listdir(dumps) if n.startswith(".epoch-1.pkl.")]  # the half-written temporary file
    _assert_dumps_equal(dumps, uninterrupted, ["epoch-pre.pkl"])
    # as if the run had been started by a version without manifests: its dumps are adopted on resume
    os.remove(dumps / "manifest.json")
    capfd.readouterr()
    dump_pplxs.main(argv + ["--resume_from_checkpoint", "last"])
    m = manifest.read_manifest(str(dumps))
    assert f"note: {dumps} has no manifest.json: its dumps epoch-pre.pkl are taken as this run's (run {m['run_id']})" \
        in capfd.readouterr().err
    names = ["epoch-pre.pkl", "epoch-1.pkl", "epoch-2.pkl"]
    assert _listing(dumps) == sorted([*names, "manifest.json"])  # the temporary file is removed
    _assert_dumps_equal(dumps, uninterrupted, names)
    _assert_one_run(dumps, m["run_id"], names)
    assert [n for n in names if m["files"][n].get("adopted")] == ["epoch-pre.pkl"]


@pytest.mark.slow
def test_train_killed_while_saving_a_checkpoint(tiny_llama, dataset, tmp_path, capfd):
    """train.py killed while writing checkpoint-4 of 6 steps; resumed with `last` from checkpoint-2, its
    final weights equal an uninterrupted run's."""
    from transformers import AutoModelForCausalLM

    def argv(out, *extra):
        return ["--model_name_or_path", tiny_llama, "--data_path", dataset, "--output_dir", str(out),
                "--model_max_length", "256", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                "--max_steps", "6", "--disable_tqdm", "True", "--seed", "42", "--report_to", "none", *STEPS, *extra]

    train.main(argv(tmp_path / "full"))
    cut = tmp_path / "cut"
    run_until_hang("train", "save:4", argv(cut), tmp_path / "log")
    assert "trainer_state.json" not in os.listdir(cut / "checkpoint-4")
    capfd.readouterr()
    trainer = train.main(argv(cut, "--resume_from_checkpoint", "last"))
    assert "note: skipping incomplete checkpoint-4" in capfd.readouterr().err and trainer.state.global_step == 6
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
