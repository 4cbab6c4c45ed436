"""dump_pplxs.py end to end on CPU (tiny models, in-process): the dump file set, P after training
below P0, the pre-training dump equal to an independent scoring, resume after a kill, bad flags."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dump_pplxs
from small2large import scoring
from small2large.dumps import load_pplxs
from small2large.rendering import SupervisedData, tokenize_records
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import TINY_RECORDS
from utils import UserError, write_pickle


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


def _argv(model, data, tmp, epochs, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(tmp / "out"),
            "--dump_dir", str(tmp / "dumps"), "--num_train_epochs", str(epochs),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "256",
            "--seed", "42", "--report_to", "none", "--disable_tqdm", "True", "--logging_steps", "1",
            "--save_strategy", "no", *extra]


def _files(d):
    return sorted(os.listdir(d))


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 3])
def test_dump_files_and_learning(epochs, tiny_llama, tiny_dataset, tmp_path):
    written = dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, epochs))
    names = ["epoch-pre.pkl"] + [f"epoch-{k}.pkl" for k in range(1, epochs + 1)]
    assert _files(tmp_path / "dumps") == sorted([*names, "manifest.json"])
    assert [os.path.basename(p) for p in written] == names  # pre first, then one per epoch, in order
    _check_manifest(tmp_path / "dumps", tiny_llama, tiny_dataset, names, ["pre", *range(1, epochs + 1)])
    dumps = [load_pplxs(tmp_path / "dumps" / n) for n in names]
    assert all(len(d) == len(TINY_RECORDS) for d in dumps)
    # epoch-pre is the untouched model: equal to the independent one-record-at-a-time reference loop
    # (not score_pplxs again; pad token added as the paper does)
    model, tok = load(tiny_llama)
    data = SupervisedData(*tokenize_records(TINY_RECORDS, tok, 256))
    ref = reference_pplxs(model, data.input_ids, data.labels)
    assert max_rel_diff(list(dumps[0]), ref) < 1e-5
    assert dumps[-1].mean() < 0.8 * dumps[0].mean()  # training lowers the perplexities
    if epochs == 3:
        assert dumps[1].mean() > dumps[3].mean()


def _check_manifest(dumps, model, data, names, epochs, others=()):
    """manifest.json describes the run: dataset (sha256 by hashlib here), settings, and every dump."""
    m = json.loads((dumps / "manifest.json").read_text())
    assert m["dataset"] == {"path": os.path.abspath(data), "n_records": len(TINY_RECORDS),
                            "sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest()}
    assert m["settings"] == {"model": model, "tokenizer": model, "model_max_length": 256, "pplx_denominator": "nonzero",
                             "pplx_logits": "scored", "seed": 42, "response_boundary": "auto", "chat_template": "auto",
                             "alpaca_as_chat": False, "lora": None,
                             "fields": {"instruction": "instruction", "input": "input", "output": "output",
                                        "messages": "messages"}}
    assert m["world_size"] == 1 and m["versions"]["torch"] == torch.__version__ and len(m["run_id"]) == 16
    assert sorted(m["files"]) == sorted([*names, *others])
    for name, epoch in zip(names, epochs):
        e = m["files"][name]
        assert (e["epoch"], e["run_id"], e["n_records"]) == (epoch, m["run_id"], len(TINY_RECORDS))
        assert e["sha256"] == hashlib.sha256((dumps / name).read_bytes()).hexdigest()
    return m


@pytest.mark.slow
@pytest.mark.parametrize("flags, partial, epoch", [(["--max_steps", "4"], "epoch-1.33-partial.pkl", 4 / 3),
                                                   (["--num_train_epochs", "0.5"], "epoch-0.66-partial.pkl", 2 / 3)])
def test_partial_last_epoch_never_replaces_a_whole_epoch(flags, partial, epoch, tiny_llama, tiny_dataset, tmp_path):
    """3 steps per epoch: --max_steps 4 stops 1.33 epochs in, --num_train_epochs 0.5 after 2 steps (0.67).
    The partial epoch gets its own file (the old code wrote it over epoch-1.pkl, or as epoch-1.pkl);
    the manifest marks it partial and step 3 refuses it."""
    from small2large import manifest

    written = dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, 1, *flags))
    d = tmp_path / "dumps"
    whole = ["epoch-pre.pkl", "epoch-1.pkl"] if epoch > 1 else ["epoch-pre.pkl"]
    assert [os.path.basename(p) for p in written] == [*whole, partial]
    assert _files(d) == sorted([*whole, partial, "manifest.json"])
    m = _check_manifest(d, tiny_llama, tiny_dataset, whole, ["pre", 1][:len(whole)], [partial])
    e = m["files"][partial]
    assert e["partial"] and e["epoch"] == pytest.approx(epoch) and e["global_step"] == round(3 * epoch)
    # the partial dump is the final model's perplexities; epoch-1.pkl is the model after 3 steps
    model, tok = load(str(tmp_path / "out"))
    final, _ = scoring.score_pplxs(model, SupervisedData(*tokenize_records(TINY_RECORDS, tok, 256)),
                                      tok.pad_token_id, progress=False)
    assert max_rel_diff(list(load_pplxs(d / partial)), final) < 1e-5
    if epoch > 1:
        assert max_rel_diff(list(load_pplxs(d / "epoch-1.pkl")), final) > 1e-3
    with pytest.raises(UserError, match="partial last epoch"):
        manifest.check_dumps(tiny_dataset, len(TINY_RECORDS), {"epoch0": str(d / "epoch-pre.pkl"),
                                                               "epoch1": str(d / partial)})


@pytest.mark.slow
def test_resume_at_the_last_step_writes_the_missed_partial_dump(tiny_llama, tiny_dataset, tmp_path):
    """Killed right after the checkpoint of the last step (4 of --max_steps 4, 1.33 epochs), before the
    partial dump: the resumed run writes it from that checkpoint, under the same name and with the same
    values as an uninterrupted run (the Trainer then runs one more step, at lr 0, which is not dumped)."""
    ckpt = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path / "a", 1, *ckpt))
    b_argv = _argv(tiny_llama, tiny_dataset, tmp_path / "b", 1, *ckpt)
    with pytest.raises(_Killed):
        dump_pplxs.main(b_argv, callbacks=[_killer("save", 4)])
    a, b = tmp_path / "a" / "dumps", tmp_path / "b" / "dumps"
    assert _files(b) == ["epoch-1.pkl", "epoch-pre.pkl", "manifest.json"]
    written = dump_pplxs.main(b_argv + ["--resume_from_checkpoint", "last"])
    assert [os.path.basename(p) for p in written] == ["epoch-1.33-partial.pkl"]
    assert _files(b) == _files(a) == ["epoch-1.33-partial.pkl", "epoch-1.pkl", "epoch-pre.pkl", "manifest.json"]
    np.testing.assert_allclose(load_pplxs(b / "epoch-1.33-partial.pkl"), load_pplxs(a / "epoch-1.33-partial.pkl"),
                               rtol=1e-6, atol=0)


def test_fresh_run_refuses_another_runs_dumps(tiny_llama, tiny_dataset, tmp_path):
    """A dump folder holding dumps without a manifest, or another run's: a fresh run stops before
    loading anything (the old code warned and mixed them); nothing is touched."""
    from small2large import manifest

    d = tmp_path / "dumps"
    d.mkdir()
    write_pickle(d / "epoch-3.pkl", [2.0] * len(TINY_RECORDS))
    with pytest.raises(UserError, match=r"holds the dumps of another run: a run without a manifest; pass "
                                        r"--overwrite_dumps to remove them"):
        dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, 1))
    manifest.write_manifest(str(d), {"run_id": "0123456789abcdef", "files": {
        "epoch-3.pkl": manifest.file_entry(str(d / "epoch-3.pkl"), 3, "0123456789abcdef", False)}})
    with pytest.raises(UserError, match=r"holds the dumps of another run: run 0123456789abcdef \(epoch-3.pkl;"):
        dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, 1))
    assert _files(d) == ["epoch-3.pkl", "manifest.json"] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_overwrite_dumps_replaces_the_old_run(tiny_llama, tiny_dataset, tmp_path):
    """--overwrite_dumps: the old run's dumps (here a longer run's epoch-2/epoch-3) are removed, not
    left beside the new P0/P1 where process_pickle.py would have combined them."""
    from small2large import manifest

    d = tmp_path / "dumps"
    old = "0123456789abcdef"
    files = {}
    for name, epoch in (("epoch-pre.pkl", "pre"), ("epoch-1.pkl", 1), ("epoch-2.pkl", 2), ("epoch-3.pkl", 3)):
        write_pickle(d / name, [5.0 if epoch == "pre" else 5.0 - epoch] * len(TINY_RECORDS))
        files[name] = manifest.file_entry(str(d / name), epoch, old, False)
    manifest.write_manifest(str(d), {"run_id": old, "files": files})
    dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, 1, "--overwrite_dumps", "True"))
    assert _files(d) == ["epoch-1.pkl", "epoch-pre.pkl", "manifest.json"]
    m = _check_manifest(d, tiny_llama, tiny_dataset, ["epoch-pre.pkl", "epoch-1.pkl"], ["pre", 1])
    assert m["run_id"] != old
    assert load_pplxs(d / "epoch-pre.pkl")[0] != 5.0


def test_val_data_path_must_equal_data_path(tiny_llama, tiny_dataset, tmp_path):
    other = tmp_path / "other.json"
    other.write_text("[]")
    with pytest.raises(UserError, match="val_data_path"):
        dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path, 1, "--val_data_path", str(other)))
    assert not (tmp_path / "dumps").exists()


class _Killed(Exception):
    pass


def _killer(event, step):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if event == "step" and state.global_step == step:
                raise _Killed(step)

        def on_save(self, args, state, control, **kw):
            if event == "save" and state.global_step == step:
                raise _Killed(step)

    return Kill()


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tiny_opt, tiny_dataset, tmp_path):
    """12 records, batch 4: 3 steps per epoch, checkpoints every 2 steps... and at step 3 (end of
    epoch 1). OPT has dropout, so the RNG state restored from the checkpoint matters."""
    ckpt = ["--save_strategy", "steps", "--save_steps", "1"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dump_pplxs.main(_argv(tiny_opt, tiny_dataset, tmp_path / "a", 2, *ckpt))
    a = tmp_path / "a" / "dumps"
    assert _files(a) == ["epoch-1.pkl", "epoch-2.pkl", "epoch-pre.pkl", "manifest.json"]

    b_argv = _argv(tiny_opt, tiny_dataset, tmp_path / "b", 2, *ckpt)
    b, out = tmp_path / "b" / "dumps", tmp_path / "b" / "out"
    # killed right after the end-of-epoch-1 checkpoint was saved, before the epoch-1 dump
    with pytest.raises(_Killed):
        dump_pplxs.main(b_argv, callbacks=[_killer("save", 3)])
    assert _files(b) == ["epoch-pre.pkl", "manifest.json"]
    run_id = json.loads((b / "manifest.json").read_text())["run_id"]
    pre = (b / "epoch-pre.pkl").read_bytes()
    pre_mtime = os.stat(b / "epoch-pre.pkl").st_mtime_ns
    # resumed, then killed again mid-epoch 2 (step 5; last checkpoint at step 4)
    with pytest.raises(_Killed):
        dump_pplxs.main(b_argv + ["--resume_from_checkpoint", str(out / "checkpoint-3")],
                        callbacks=[_killer("step", 5)])
    assert _files(b) == ["epoch-1.pkl", "epoch-pre.pkl", "manifest.json"]  # the missed epoch-1 dump, from checkpoint-3
    e1_mtime = os.stat(b / "epoch-1.pkl").st_mtime_ns
    dump_pplxs.main(b_argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert _files(b) == ["epoch-1.pkl", "epoch-2.pkl", "epoch-pre.pkl", "manifest.json"]
    m = json.loads((b / "manifest.json").read_text())  # the resumed runs continue the same run
    assert m["run_id"] == run_id and {e["run_id"] for e in m["files"].values()} == {run_id} and len(m["files"]) == 3
    # the dumps already written are kept as they were
    assert (b / "epoch-pre.pkl").read_bytes() == pre and os.stat(b / "epoch-pre.pkl").st_mtime_ns == pre_mtime
    assert os.stat(b / "epoch-1.pkl").st_mtime_ns == e1_mtime
    for name in ("epoch-pre.pkl", "epoch-1.pkl", "epoch-2.pkl"):
        pa, pb = load_pplxs(a / name), load_pplxs(b / name)
        np.testing.assert_allclose(pb, pa, rtol=1e-6, atol=0, err_msg=name)
    assert load_pplxs(a / "epoch-2.pkl").mean() < load_pplxs(a / "epoch-pre.pkl").mean()


@pytest.mark.slow
def test_default_denominator_is_the_papers_nonzero_end_to_end(tiny_llama_zero_loss, tiny_dataset, tmp_path):
    """A model that predicts eos after "." with probability exactly 1.0 (token loss exactly 0): the paper's
    "nonzero" denominator (loss sum / non-zero token losses) and the textbook mean then differ. The engine
    computes each as the independent one-record loop does, and dump_pplxs.py without --pplx_denominator
    dumps the paper's."""
    model, tok = load(tiny_llama_zero_loss)
    data = SupervisedData(*tokenize_records(TINY_RECORDS, tok, 256))
    ref = {den: reference_pplxs(model, data.input_ids, data.labels, den) for den in ("nonzero", "mean")}
    differ = [i for i, (a, b) in enumerate(zip(ref["nonzero"], ref["mean"])) if abs(a / b - 1) > 0.1]
    assert differ == [i for i, r in enumerate(TINY_RECORDS) if r["output"].endswith(".")]   # and only those
    for den in ("nonzero", "mean"):
        got, _ = scoring.score_pplxs(model, data, tok.pad_token_id, max_tokens=300, denominator=den, progress=False)
        err = max_rel_diff(got, ref[den])
        assert err < 1e-5, f"score_pplxs(denominator={den!r}) differs from the {den!r} reference by {err:.2g}"
    dump_pplxs.main(_argv(tiny_llama_zero_loss, tiny_dataset, tmp_path, 1))   # the default denominator
    pre = list(load_pplxs(tmp_path / "dumps" / "epoch-pre.pkl"))
    assert max_rel_diff(pre, ref["nonzero"]) < 1e-5, (
        f"epoch-pre.pkl is not the paper's 'nonzero' perplexity (records {differ}: dumped "
        f"{[round(float(pre[i]), 2) for i in differ]}, nonzero {[round(ref['nonzero'][i], 2) for i in differ]}, "
        f"mean {[round(ref['mean'][i], 2) for i in differ]})")
