"""Step 3 checks the dumps against their manifest.json (manifest.py): one run, the dataset given, whole
epochs in order; the paper's bare pickles load as before. Resumed dump runs continue the recorded run."""

import json
import os
import shutil
from pathlib import Path

import pytest
from _step3_helpers import dump_args, make_workspace, write_pickle_plain

import dump_pplxs
import manifest
import process_pickle
import subset
from utils import UserError

EPOCHS = {"epoch0": "pre", "epoch1": 1, "epoch2": 2, "epoch3": 3}


def add_manifest(paths, run_id="aaaaaaaaaaaaaaaa", dataset=None, epochs=EPOCHS, partial=()):
    """A manifest beside the workspace's dumps, as dump_pplxs.py writes it."""
    d = os.path.dirname(paths["epoch0"])
    files = {}
    for flag, epoch in epochs.items():
        files[os.path.basename(paths[flag])] = manifest.file_entry(paths[flag], epoch, run_id, flag in partial)
    ds = dataset or paths["dataset"]
    with open(ds) as f:
        n = len(json.load(f))
    manifest.write_manifest(d, {"format": 1, "run_id": run_id, "files": files,
                                "dataset": {"path": ds, "sha256": manifest.sha256_file(ds), "n_records": n}})


@pytest.fixture()
def ws(tmp_path):
    return make_workspace(str(tmp_path / "in"), n=60, k=3)


def _run_both(ws, tmp_path):
    process_pickle.main(dump_args(ws["paths"], "--output_dir", str(tmp_path / "rk")))
    return subset.main(dump_args(ws["paths"], "--percentage", "10", "--lp1", "--output_dir", str(tmp_path / "o")))


def test_dumps_of_one_run_pass(ws, tmp_path):
    bare = _run_both(ws, tmp_path / "bare")  # the paper's pickles: no manifest, no check
    add_manifest(ws["paths"])
    assert [idx.tolist() for idx in _run_both(ws, tmp_path / "m").values()] == [idx.tolist() for idx in bare.values()]


def _other_run(ws, tmp_path):
    """epoch-3.pkl of another run (its own folder and manifest) given as --epoch3."""
    add_manifest(ws["paths"])
    other = make_workspace(str(tmp_path / "other"), n=60, k=3, seed=1)
    shutil.copy(ws["paths"]["dataset"], other["paths"]["dataset"])
    add_manifest(other["paths"], run_id="bbbbbbbbbbbbbbbb")
    ws["paths"]["epoch3"] = other["paths"]["epoch3"]


def _stale_file(ws, tmp_path):
    """A longer earlier run's epoch-3.pkl left beside this run's P0..P2 (the issue's silent mix)."""
    add_manifest(ws["paths"], epochs={k: v for k, v in EPOCHS.items() if k != "epoch3"})


def _modified(ws, tmp_path):
    add_manifest(ws["paths"])
    write_pickle_plain(ws["paths"]["epoch2"], [3.0] * 60)


def _other_dataset(ws, tmp_path):
    add_manifest(ws["paths"])
    with open(ws["paths"]["dataset"]) as f:
        records = json.load(f)
    records[5]["output"] = "changed"
    with open(ws["paths"]["dataset"], "w") as f:
        json.dump(records, f, indent=4)


def _partial(ws, tmp_path):
    add_manifest(ws["paths"], epochs={**EPOCHS, "epoch3": 2.3333333}, partial=("epoch3",))


def _not_pre(ws, tmp_path):
    add_manifest(ws["paths"], epochs={**EPOCHS, "epoch0": 1, "epoch1": 2, "epoch2": 3, "epoch3": 4})


def _order(ws, tmp_path):
    add_manifest(ws["paths"], epochs={**EPOCHS, "epoch1": 2, "epoch2": 1})


def _half_bare(ws, tmp_path):
    add_manifest(ws["paths"])
    other = make_workspace(str(tmp_path / "bare"), n=60, k=3)
    ws["paths"]["epoch1"] = other["paths"]["epoch1"]


@pytest.mark.parametrize("damage, match", [
    (_other_run, r"the dumps come from different runs \(.*epoch-pre.pkl \(--epoch0\): run aaaaaaaaaaaaaaaa, .*"
                 r"other/epoch-3.pkl \(--epoch3\): run bbbbbbbbbbbbbbbb\)"),
    (_stale_file, r"epoch-3.pkl \(--epoch3\) is not listed in .*manifest.json: not a dump of run aaaaaaaaaaaaaaaa"),
    (_modified, r"epoch-2.pkl \(--epoch2\) is not the file run aaaaaaaaaaaaaaaa wrote"),
    (_other_dataset, r"--dataset .*data.json is not the dataset .*epoch-pre.pkl \(--epoch0\) was dumped for"),
    (_partial, r"epoch-3.pkl \(--epoch3\) is the dump of a partial last epoch \(2.3333333 epochs"),
    (_not_pre, r"\(--epoch0\) is the dump after epoch 1, not the pre-training dump"),
    (_order, r"--epoch1 is epoch 2 and --epoch2 is epoch 1: give the epoch dumps in training order"),
    (_half_bare, r"/bare/epoch-1.pkl \(--epoch1\) has no manifest.json beside it but .*epoch-pre.pkl \(--epoch0\) has"),
])
def test_mixed_or_stale_dumps_are_refused(ws, tmp_path, damage, match):
    """Each of these was combined silently before manifests existed."""
    damage(ws, tmp_path)
    for fn, extra in ((process_pickle.main, []), (subset.main, ["--percentage", "10", "--lp1"])):
        with pytest.raises(UserError, match=match):
            fn(dump_args(ws["paths"], *extra, "--output_dir", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_epoch_other_than_the_flag_warns(ws, tmp_path, capsys):
    add_manifest(ws["paths"], epochs={**EPOCHS, "epoch3": 4})
    process_pickle.main(dump_args(ws["paths"], "--output_dir", str(tmp_path / "rk")))
    assert "(--epoch3) is the dump after epoch 4, not after epoch 3" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# dump_pplxs.py: a resume continues the run recorded in --dump_dir


def _resume_argv(model, data, tmp_path, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(tmp_path / "out"),
            "--dump_dir", str(tmp_path / "dumps"), "--report_to", "none", "--resume_from_checkpoint", "last", *extra]


def test_resume_checks_the_recorded_run(tiny_llama, tiny_dataset, tmp_path):
    """Before loading anything: the checkpoint must come from the run's --output_dir, the dataset must be
    the one it dumped."""
    from test_preemption import make_checkpoint

    make_checkpoint(str(tmp_path / "out"), 3)
    d = str(tmp_path / "dumps")
    os.makedirs(d)
    ds = {"path": tiny_dataset, "sha256": manifest.sha256_file(tiny_dataset), "n_records": 12}
    manifest.write_manifest(d, {"run_id": "cccccccccccccccc", "files": {}, "dataset": ds,
                                "output_dir": str(tmp_path / "elsewhere")})
    with pytest.raises(UserError, match=r"holds the dumps of run cccccccccccccccc, trained in .*elsewhere; the "
                                        r"checkpoint resumed, .*out/checkpoint-3, is not from that run"):
        dump_pplxs.main(_resume_argv(tiny_llama, tiny_dataset, tmp_path))
    other = tmp_path / "other.json"
    other.write_text(Path(tiny_dataset).read_text().replace("Paris", "Lyon"))
    manifest.write_manifest(d, {"run_id": "cccccccccccccccc", "files": {}, "dataset": ds,
                                "output_dir": str(tmp_path / "out")})
    with pytest.raises(UserError, match=r"--data_path .*other.json is not the dataset of run cccccccccccccccc"):
        dump_pplxs.main(_resume_argv(tiny_llama, str(other), tmp_path))
    with pytest.raises(UserError, match=r"run cccccccccccccccc in .* was made with pplx_denominator='nonzero'; this "
                                        r"resumed run has pplx_denominator='mean'"):
        manifest.check_settings({"run_id": "cccccccccccccccc", "settings": {"pplx_denominator": "nonzero"}},
                                {"pplx_denominator": "mean"}, d)
