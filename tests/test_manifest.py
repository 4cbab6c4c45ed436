"""Step 3 checks the dumps against their manifest.json (manifest.py): one run, the dataset given, whole
epochs in order; the paper's bare pickles load as before. Resumed dump runs continue the recorded run."""

import json
import os
import shutil
from pathlib import Path

import pytest
from _step3_helpers import dump_args, make_workspace, write_pickle_plain

import dump_pplxs
import process_pickle
import subset
from small2large import manifest
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


# ----------------------------------------------------------------------------------------
# the no-prompt (IFD) dumps belong to the manifest; --score_only is checked and recorded; resume flags


def _add_noprompt(ws, run_id="aaaaaaaaaaaaaaaa", epoch="pre", listed=True):
    """{dumps}/noprompt/epoch-{epoch}.pkl, listed (or not) in the manifest of the workspace's dumps."""
    d = os.path.dirname(ws["paths"]["epoch0"])
    path = os.path.join(d, "noprompt", f"epoch-{epoch}.pkl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_pickle_plain(path, [float(x) * 2 for x in range(1, 61)])
    if listed:
        m = manifest.read_manifest(d)
        m["files"][f"noprompt/epoch-{epoch}.pkl"] = manifest.file_entry(path, epoch, run_id, False, noprompt=True)
        manifest.write_manifest(d, m)
    return path


def test_noprompt_dump_is_checked_against_the_manifest(ws, tmp_path):
    """process_pickle.py --noprompt: the run's own noprompt/epoch-pre.pkl passes; a stale one (not listed),
    another run's, or one of another epoch is refused (they were paired into IFD silently)."""
    bare_np = _add_noprompt(ws, listed=False)
    process_pickle.main(dump_args(ws["paths"], "--noprompt", bare_np, "--output_dir", str(tmp_path / "bare")))
    add_manifest(ws["paths"])  # the dumps of run a, but its noprompt file is left by another run
    with pytest.raises(UserError, match=r"noprompt/epoch-pre.pkl \(--noprompt\) is not listed in .*in/manifest.json"):
        process_pickle.main(dump_args(ws["paths"], "--noprompt", bare_np, "--output_dir", str(tmp_path / "o1")))
    own = _add_noprompt(ws)
    process_pickle.main(dump_args(ws["paths"], "--noprompt", own, "--output_dir", str(tmp_path / "ok")))
    with pytest.raises(UserError, match=r"\(--noprompt\) is the no-prompt dump at epoch pre; --noprompt_epoch 3 "
                                        r"needs noprompt/epoch-3.pkl"):
        process_pickle.main(dump_args(ws["paths"], "--noprompt", own, "--noprompt_epoch", "3",
                                      "--output_dir", str(tmp_path / "o2")))
    with pytest.raises(UserError, match=r"epoch-1.pkl \(--noprompt\) is not a no-prompt dump"):
        process_pickle.main(dump_args(ws["paths"], "--noprompt", ws["paths"]["epoch1"], "--noprompt_epoch", "1",
                                      "--output_dir", str(tmp_path / "o3")))
    other = make_workspace(str(tmp_path / "other"), n=60, k=3, seed=1)
    shutil.copy(ws["paths"]["dataset"], other["paths"]["dataset"])
    add_manifest(other["paths"], run_id="bbbbbbbbbbbbbbbb")
    theirs = _add_noprompt(other, run_id="bbbbbbbbbbbbbbbb")
    with pytest.raises(UserError, match=r"different runs .*other/noprompt/epoch-pre.pkl \(--noprompt\): run bbbb"):
        process_pickle.main(dump_args(ws["paths"], "--noprompt", theirs, "--output_dir", str(tmp_path / "o4")))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_noprompt_dumps_are_in_the_fresh_folder_check(tmp_path):
    d = tmp_path / "dumps"
    (d / "noprompt").mkdir(parents=True)
    write_pickle_plain(str(d / "noprompt" / "epoch-pre.pkl"), [1.0])
    assert manifest.dump_files(str(d)) == ["noprompt/epoch-pre.pkl"]
    with pytest.raises(UserError, match="holds the dumps of another run"):
        manifest.check_fresh_dump_dir(str(d), overwrite=False)
    assert manifest.check_fresh_dump_dir(str(d), overwrite=True) == ["noprompt/epoch-pre.pkl"]


def _score_only_argv(model, data, tmp_path, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(tmp_path / "out"),
            "--dump_dir", str(tmp_path / "dumps"), "--report_to", "none", "--model_max_length", "128",
            "--score_only", "True", *extra]


def test_score_only_refuses_another_runs_dumps_and_writes_a_manifest(tiny_llama, tiny_dataset, tmp_path):
    d = tmp_path / "dumps"
    (d / "noprompt").mkdir(parents=True)
    write_pickle_plain(str(d / "epoch-pre.pkl"), [7.0] * 12)
    write_pickle_plain(str(d / "noprompt" / "epoch-3.pkl"), [7.0] * 12)
    before = (d / "epoch-pre.pkl").read_bytes()
    with pytest.raises(UserError, match="holds the dumps of another run: a run without a manifest"):
        dump_pplxs.main(_score_only_argv(tiny_llama, tiny_dataset, tmp_path))
    assert (d / "epoch-pre.pkl").read_bytes() == before and not (d / "manifest.json").exists()
    dump_pplxs.main(_score_only_argv(tiny_llama, tiny_dataset, tmp_path, "--overwrite_dumps", "True",
                                     "--dump_noprompt", "pre"))
    m = manifest.read_manifest(str(d))
    assert m["score_only"] is True and m["output_dir"] is None and m["dataset"]["n_records"] == 12
    assert sorted(m["files"]) == ["epoch-pre.pkl", "noprompt/epoch-pre.pkl"] == manifest.dump_files(str(d))
    assert m["files"]["noprompt/epoch-pre.pkl"]["noprompt"] is True
    assert {e["run_id"] for e in m["files"].values()} == {m["run_id"]}
    manifest.check_dumps(tiny_dataset, 12, {"epoch0": str(d / "epoch-pre.pkl")},
                         noprompt=(str(d / "noprompt" / "epoch-pre.pkl"), 0))
    # a second score-only run into the folder is refused like a training run
    with pytest.raises(UserError, match=f"holds the dumps of another run: run {m['run_id']}"):
        dump_pplxs.main(_score_only_argv(tiny_llama, tiny_dataset, tmp_path))


class _Tok:
    name_or_path = "tok"


@pytest.mark.parametrize("flag, value, key", [
    ("--response_boundary", "exact", "response_boundary"),
    ("--chat_template", "builtin", "chat_template"),
    ("--alpaca_as_chat", "True", "alpaca_as_chat"),
    ("--output_field", "answer", "fields"),
    ("--lora_r", "8", "lora"),
    ("--lora_alpha", "32", "lora"),
])
def test_resume_must_keep_the_rendering_and_lora_flags(tiny_dataset, tmp_path, flag, value, key):
    """A resumed dump run with other rendering / column / LoRA flags would mix dumps of other tokens."""
    base = ["--model_name_or_path", "m", "--data_path", tiny_dataset, "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--lora_r", "4"]
    first = dump_pplxs.parse_args(base)
    run = {"replace": [], "dataset": {"path": tiny_dataset, "sha256": "x"}}
    m, _ = manifest.settle_manifest(run, [0] * 12, _Tok(), *first)
    again = manifest.settle_manifest({**run, "old": json.loads(json.dumps(m))}, [0] * 12, _Tok(), *first)
    assert again[0]["run_id"] == m["run_id"]   # the same flags resume
    changed = dump_pplxs.parse_args(base + [flag, value])
    with pytest.raises(UserError, match=rf"was made with {key}=.*; this resumed run has {key}="):
        manifest.settle_manifest({**run, "old": json.loads(json.dumps(m))}, [0] * 12, _Tok(), *changed)
