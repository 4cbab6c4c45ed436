"""dump_pplxs.py end to end on CPU (tiny models, in-process): the dump file set, P after training
below P0, the pre-training dump equal to an independent scoring, resume after a kill, bad flags."""

import os

import numpy as np
import pytest

import dump_pplxs
from tests._dump_pplxs_helpers import load, max_rel_diff, one_thread_fixture, reference_pplxs
from tests.conftest import TINY_RECORDS
from utils import SupervisedData, UserError, load_pplxs, tokenize_records


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
    assert _files(tmp_path / "dumps") == sorted(names)
    assert [os.path.basename(p) for p in written] == names  # pre first, then one per epoch, in order
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
    assert _files(a) == ["epoch-1.pkl", "epoch-2.pkl", "epoch-pre.pkl"]

    b_argv = _argv(tiny_opt, tiny_dataset, tmp_path / "b", 2, *ckpt)
    b, out = tmp_path / "b" / "dumps", tmp_path / "b" / "out"
    # killed right after the end-of-epoch-1 checkpoint was saved, before the epoch-1 dump
    with pytest.raises(_Killed):
        dump_pplxs.main(b_argv, callbacks=[_killer("save", 3)])
    assert _files(b) == ["epoch-pre.pkl"]
    pre = (b / "epoch-pre.pkl").read_bytes()
    pre_mtime = os.stat(b / "epoch-pre.pkl").st_mtime_ns
    # resumed, then killed again mid-epoch 2 (step 5; last checkpoint at step 4)
    with pytest.raises(_Killed):
        dump_pplxs.main(b_argv + ["--resume_from_checkpoint", str(out / "checkpoint-3")],
                        callbacks=[_killer("step", 5)])
    assert _files(b) == ["epoch-1.pkl", "epoch-pre.pkl"]  # the missed epoch-1 dump, from checkpoint-3
    e1_mtime = os.stat(b / "epoch-1.pkl").st_mtime_ns
    dump_pplxs.main(b_argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert _files(b) == ["epoch-1.pkl", "epoch-2.pkl", "epoch-pre.pkl"]
    # the dumps already written are kept as they were
    assert (b / "epoch-pre.pkl").read_bytes() == pre and os.stat(b / "epoch-pre.pkl").st_mtime_ns == pre_mtime
    assert os.stat(b / "epoch-1.pkl").st_mtime_ns == e1_mtime
    for name in ("epoch-pre.pkl", "epoch-1.pkl", "epoch-2.pkl"):
        pa, pb = load_pplxs(a / name), load_pplxs(b / name)
        np.testing.assert_allclose(pb, pa, rtol=1e-6, atol=0, err_msg=name)
    assert load_pplxs(a / "epoch-2.pkl").mean() < load_pplxs(a / "epoch-pre.pkl").mean()
