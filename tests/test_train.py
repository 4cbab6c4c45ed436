"""train.py: the legacy-flag translation, the CPU fallback, a short training run (outputs and a
falling loss), resuming an interrupted run, and the paper's command as written under torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
import utils
from small2large import finetune, legacy_flags, models, rendering

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# translate_legacy_flags


def test_renames_in_both_flag_forms(capsys):
    assert legacy_flags.translate_legacy_flags(["--evaluation_strategy", "no", "--seed", "1"]) == [
        "--eval_strategy", "no", "--seed", "1"]
    assert legacy_flags.translate_legacy_flags(["--evaluation_strategy=steps"]) == ["--eval_strategy=steps"]
    assert legacy_flags.translate_legacy_flags(["--evaluation-strategy", "no"]) == ["--eval_strategy", "no"]
    assert legacy_flags.translate_legacy_flags(["--gradient_checkpointing", "True"]) == ["--activation_checkpointing", "True"]
    assert legacy_flags.translate_legacy_flags(["--gradient_checkpointing"]) == ["--activation_checkpointing"]
    err = capsys.readouterr().err
    assert err.count("note: --evaluation_strategy is --eval_strategy") == 3
    assert err.count("note: --gradient_checkpointing is --activation_checkpointing") == 2


def test_warmup_ratio_becomes_fractional_warmup_steps(capsys):
    assert legacy_flags.translate_legacy_flags(["--warmup_ratio", "0.03", "--bf16", "True"]) == [
        "--warmup_steps", "0.03", "--bf16", "True"]
    assert legacy_flags.translate_legacy_flags(["--warmup_ratio=0.5"]) == ["--warmup_steps", "0.5"]
    assert capsys.readouterr().err.count("note: --warmup_ratio") == 2
    for bad in (["--warmup_ratio", "1.0"], ["--warmup_ratio", "-0.1"], ["--warmup_ratio", "abc"],
                ["--warmup_ratio"], ["--warmup_ratio", "0.1", "--warmup_steps", "5"]):
        with pytest.raises(legacy_flags.LegacyFlagError):
            legacy_flags.translate_legacy_flags(bad)


def test_fractional_warmup_steps_is_the_old_ratio_formula(tmp_path, tiny_dataset):
    # transformers 4.x: warmup = ceil(warmup_ratio * total_steps); 5.x with warmup_steps < 1 must agree
    _, _, args = train.parse_args(["--data_path", tiny_dataset, "--output_dir", str(tmp_path),
                                   "--warmup_ratio", "0.03"])
    assert args.warmup_steps == pytest.approx(0.03)
    assert [args.get_warmup_steps(n) for n in (1, 33, 34, 100, 1000)] == [1, 1, 2, 3, 30]


def test_layer_cls_goes_into_fsdp_config(tmp_path, capsys):
    out = legacy_flags.translate_legacy_flags(["--fsdp", "full_shard auto_wrap",
                                        "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"])
    assert out[:2] == ["--fsdp", "full_shard auto_wrap"] and out[2] == "--fsdp_config"
    assert json.loads(out[3]) == {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert "note: --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer" in capsys.readouterr().err
    # merged into an inline config, '=' form, several classes
    out = legacy_flags.translate_legacy_flags(["--fsdp_config={\"version\": 2}",
                                        "--fsdp_transformer_layer_cls_to_wrap=A,B", "--seed", "3"])
    assert out == ["--fsdp_config", json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["A", "B"]}),
                   "--seed", "3"]
    # merged into a config file (its fsdp_-prefixed key replaced)
    cfg = tmp_path / "fsdp.json"
    cfg.write_text(json.dumps({"fsdp_transformer_layer_cls_to_wrap": "Old", "cpu_offload": False}))
    out = legacy_flags.translate_legacy_flags(["--fsdp_transformer_layer_cls_to_wrap", "OPTDecoderLayer",
                                        "--fsdp_config", str(cfg)])
    assert json.loads(out[out.index("--fsdp_config") + 1]) == {
        "cpu_offload": False, "transformer_layer_cls_to_wrap": ["OPTDecoderLayer"]}
    with pytest.raises(legacy_flags.LegacyFlagError):
        legacy_flags.translate_legacy_flags(["--fsdp_transformer_layer_cls_to_wrap", "X", "--fsdp_config", "missing.json"])


def test_translated_fsdp_config_reaches_the_fsdp_plugin():
    # what TrainingArguments makes of the translated flags on a GPU machine (no fallback applied)
    argv = legacy_flags.translate_legacy_flags(["--data_path", "d", "--fsdp", "full_shard auto_wrap",
                                         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"])
    ns = finetune.build_parser().parse_args(argv)
    args = finetune.TrainingArguments(output_dir="unused", fsdp=ns.fsdp, fsdp_config=ns.fsdp_config)
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert args.fsdp_config["reshard_after_forward"] is True  # full_shard


def test_gradient_checkpointing_under_fsdp_is_fsdp_activation_checkpointing(monkeypatch, tmp_path, tiny_dataset):
    fsdp = ["--data_path", "d", "--fsdp", "full_shard auto_wrap"]
    for flag in (["--gradient_checkpointing", "True"], ["--gradient_checkpointing"], ["--gradient_checkpointing=true"]):
        argv = legacy_flags.translate_legacy_flags(fsdp + flag + ["--seed", "1"])
        assert not any("checkpointing" in a for a in argv if a.startswith("--")), argv
        assert json.loads(argv[argv.index("--fsdp_config") + 1]) == {"activation_checkpointing": True}
        ns = finetune.build_parser().parse_args(argv)
        args = finetune.TrainingArguments(output_dir="unused", fsdp=ns.fsdp, fsdp_config=ns.fsdp_config,
                                       activation_checkpointing=ns.activation_checkpointing)
        # FSDP's own checkpointing; the Trainer's (which warns of a redundant all-gather) stays off
        assert args.fsdp_plugin_args["activation_checkpointing"] is True and not args.activation_checkpointing
    argv = legacy_flags.translate_legacy_flags(fsdp + ["--gradient_checkpointing", "False"])
    assert argv == fsdp
    # without FSDP: the plain rename, as before
    assert legacy_flags.translate_legacy_flags(["--gradient_checkpointing", "True"]) == ["--activation_checkpointing", "True"]
    # on a CPU, FSDP is dropped but the checkpointing is kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, args = train.parse_args(["--data_path", tiny_dataset, "--output_dir", str(tmp_path), "--fsdp",
                                   "full_shard auto_wrap", "--gradient_checkpointing", "True"])
    assert not args.fsdp and args.activation_checkpointing


def test_torchrun_without_cuda_is_data_parallel_without_bf16(monkeypatch, capsys):
    import argparse

    def fallback():
        ns = argparse.Namespace(use_cpu=False, bf16=False, fsdp=None, tf32=None)
        legacy_flags.cpu_fallback(ns)
        return ns.use_cpu

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not fallback()  # one process: untouched (MPS etc. stay usable)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fallback()  # under torchrun: DDP over gloo, not each process training alone on every record
    assert "train data parallel on the CPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# parse_args: CPU fallback and usage errors


def test_cpu_fallback(monkeypatch, tmp_path, tiny_dataset, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, data_args, args = train.parse_args([
        "--data_path", tiny_dataset, "--output_dir", str(tmp_path), "--bf16", "True", "--tf32", "True",
        "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"])
    err = capsys.readouterr().err
    assert "--tf32 dropped" in err and "bfloat16 autocast on the CPU" in err
    assert "falling back to plain data parallel" in err
    assert args.tf32 is None and args.bf16 and args.use_cpu and args.mixed_precision == "bf16"
    assert not args.fsdp and args.fsdp_plugin_args is None
    assert args.optim == "adamw_torch" and args.model_max_length == 512
    assert data_args.data_path == tiny_dataset
    _, _, args = train.parse_args(["--data_path", tiny_dataset, "--output_dir", str(tmp_path), "--fp16", "True"])
    assert not args.fp16 and args.mixed_precision == "no"
    assert "--fp16 dropped" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, tiny_dataset):
    base = ["--data_path", tiny_dataset, "--output_dir", str(tmp_path)]
    for argv in (base + ["--no_such_flag", "1"], ["--output_dir", str(tmp_path)],  # unknown, data_path missing
                 base + ["--warmup_ratio", "2"], base + ["--model_max_length", "0"],
                 base + ["--learning_rate", "fast"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2, argv
    with pytest.raises(utils.UserError, match="no such file"):
        train.parse_args(["--data_path", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path)])


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "torchrun --nproc_per_node=4" in out and "--model_max_length" in out and "--data_path" in out


def test_extra_dataclasses_are_parsed(tmp_path, tiny_dataset):
    from dataclasses import dataclass, field

    @dataclass
    class Extra:
        dump_dir: str = field(default="./dump-pplxs", metadata={"help": "x"})

    parsed = finetune.parse_args(["--data_path", tiny_dataset, "--output_dir", str(tmp_path), "--dump_dir", "d"],
                              extra_dataclasses=(Extra,))
    assert len(parsed) == 4 and parsed[3].dump_dir == "d"


# ----------------------------------------------------------------------------------------
# Training runs (tiny Llama, CPU)


def _argv(model, data, out, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(out),
            "--model_max_length", "256", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "42", *extra]


def _mean_response_loss(model, data):
    """Token-weighted mean cross-entropy over every scored token, one record at a time."""
    tot, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, lab in zip(data.input_ids, data.labels):
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            y = torch.tensor(lab[1:])
            m = y != utils.IGNORE_INDEX
            tot += torch.nn.functional.cross_entropy(logits[m], y[m], reduction="sum").item()
            n += int(m.sum())
    return tot / n


def test_short_run_saves_everything_and_lowers_the_loss(tiny_llama, tiny_dataset, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    trainer = train.main(_argv(tiny_llama, tiny_dataset, out, "--num_train_epochs", "3"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and state["epoch"] == pytest.approx(3.0)  # 12 records / 4 = 3 steps x 3
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 9 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1  # last epoch below the first (logged losses)
    # independent check on the saved files: reload, and the response loss fell against the initial model
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "[PAD]" and len(tok) == 301 and tok.padding_side == "right"
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert trained.get_input_embeddings().weight.shape[0] == 301
    data = rendering.make_supervised_data(tiny_dataset, tok, 256)
    init, init_tok = models.load_model_and_tokenizer(*[train.parse_args(_argv(tiny_llama, tiny_dataset, out))[i]
                                                      for i in (0, 2)])
    before, after = _mean_response_loss(init, data), _mean_response_loss(trained, data)
    assert after < before - 0.3, (before, after)
    for a, b in zip(trainer.model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)  # saved weights are the trained ones


def test_bf16_on_cpu_is_autocast_over_float32_weights(tiny_llama, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    margs, dargs, targs = train.parse_args(_argv(tiny_llama, tiny_dataset, tmp_path, "--max_steps", "1",
                                                 "--bf16", "True", "--tf32", "True"))
    model, tok = models.load_model_and_tokenizer(margs, targs)
    data = rendering.make_supervised_data(dargs.data_path, tok, targs.model_max_length)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, i, o: seen.append((o.dtype, mod.weight.dtype)))
    before = model.lm_head.weight.detach().clone()
    finetune.build_trainer(model, tok, data, targs).train()
    assert seen == [(torch.bfloat16, torch.float32)]  # bf16 matmuls, float32 master weights
    assert not torch.equal(before, model.lm_head.weight.detach())


class _Crash(Exception):
    pass


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_llama, tiny_dataset, tmp_path, monkeypatch):
    """Crash an 8-step run after step 3 (mid-epoch: 6 batches of 2 per epoch), resume it from
    checkpoint-3 with --resume_from_checkpoint last: it runs steps 4..8 only (crossing into epoch 2)
    and its final weights and logged losses equal those of an uninterrupted 8-step run."""
    from transformers import AutoModelForCausalLM, TrainerCallback

    steps = ["--per_device_train_batch_size", "2", "--max_steps", "8", "--save_strategy", "steps",
             "--save_steps", "3", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.2", "--weight_decay", "0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(_argv(tiny_llama, tiny_dataset, full, *steps))

    class CrashAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:  # checkpoint-3 is on disk; step 4 has not happened
                raise _Crash

    margs, dargs, targs = train.parse_args(_argv(tiny_llama, tiny_dataset, cut, *steps))
    model, tok = models.load_model_and_tokenizer(margs, targs)
    data = rendering.make_supervised_data(dargs.data_path, tok, targs.model_max_length)
    trainer = finetune.build_trainer(model, tok, data, targs, callbacks=[CrashAfter()])
    with pytest.raises(_Crash):
        trainer.train()
    assert sorted(os.listdir(cut)) == ["checkpoint-3"]

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            done.append(state.global_step)

    done, build = [], finetune.build_trainer
    monkeypatch.setattr(finetune, "build_trainer", lambda *a, **k: build(*a, callbacks=[Steps()], **k))
    trainer = train.main(_argv(tiny_llama, tiny_dataset, cut, *steps, "--resume_from_checkpoint", "last"))
    assert done == [4, 5, 6, 7, 8] and trainer.state.global_step == 8  # resumed, not restarted
    a = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32).state_dict()
    # the same data order, learning rates and optimizer state: on CPU the result is bit-identical
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    ha = [h["loss"] for h in json.loads((full / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    hb = [h["loss"] for h in json.loads((cut / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert hb == ha


def test_resume_errors(tiny_llama, tiny_dataset, tmp_path):
    with pytest.raises(utils.UserError, match="no checkpoint"):
        train.main(_argv(tiny_llama, tiny_dataset, tmp_path / "none", "--resume_from_checkpoint", "last"))
    with pytest.raises(utils.UserError, match="no such checkpoint"):
        train.main(_argv(tiny_llama, tiny_dataset, tmp_path, "--resume_from_checkpoint", str(tmp_path / "x")))


def test_all_records_truncated_is_a_user_error(tiny_llama, tiny_dataset, tmp_path):
    with pytest.raises(utils.UserError, match="truncated away"):
        train.main(_argv(tiny_llama, tiny_dataset, tmp_path, "--model_max_length", "20"))


# ----------------------------------------------------------------------------------------
# The paper's command, as written, under torchrun (2 CPU processes, gloo)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PAPER_TRAIN_FLAGS = (  # the seed README's train.py flags; only paths and step counts are substituted
    "--bf16 True --output_dir {out} --num_train_epochs 1 --per_device_train_batch_size 4 "
    "--per_device_eval_batch_size 4 --gradient_accumulation_steps 1 --evaluation_strategy no "
    "--save_strategy steps --save_steps 2000 --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. "
    "--warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1"
)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
def test_paper_command_under_torchrun(tiny_llama, tmp_path):
    """The paper's command under torchrun (2 CPU processes): it runs, and it is really data parallel:
    every rank ends with the same weights (sha256 of each rank's state dict, written by
    tests/_rank_hash.py) and they equal one process trained at the combined batch size."""
    from tests._dump_pplxs_helpers import load
    from tests.conftest import TINY_RECORDS

    data = tmp_path / "data.json"  # 16 records: 2 steps of 2 x 4, no record repeated to even out the ranks
    data.write_text(json.dumps(TINY_RECORDS + TINY_RECORDS[:4]))
    out, hashes = tmp_path / "out", tmp_path / "hashes"
    hashes.mkdir()
    flags = [*PAPER_TRAIN_FLAGS.format(out=out).split(),
             "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
             "--tf32", "True", "--seed", "42", "--gradient_checkpointing", "True"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "tests/_rank_hash.py", "train.py",
           "--model_name_or_path", tiny_llama, "--data_path", str(data), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "RANK_HASH_DIR": str(hashes)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    for line in ("note: --evaluation_strategy is --eval_strategy", "note: --warmup_ratio 0.03 is --warmup_steps 0.03",
                 "note: --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer",
                 "note: --gradient_checkpointing under --fsdp is the fsdp_config key activation_checkpointing",
                 "note: FSDP's activation checkpointing kept as --activation_checkpointing",
                 "warning: no GPU: --tf32 dropped", "warning: no GPU: --bf16 runs as bfloat16 autocast",
                 "falling back to plain data parallel"):
        assert log.count(line) == 1, (line, log[-4000:])  # once per job, not once per process
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    # 16 records over 2 processes x batch 4: 2 optimizer steps (1 process at batch 4 would take 4)
    assert state["global_step"] == 2
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    # DDP: both ranks end with bit-identical weights...
    rank_hashes = [(hashes / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert len(rank_hashes[0]) == 64 and rank_hashes[0] == rank_hashes[1], "the ranks' weights differ: not DDP"
    # ...equal to one process at the combined batch size (8), up to bf16-autocast rounding: the weights
    # differ by under 1% of how far training moved them (L2 over all parameters)
    one = tmp_path / "one"
    train.main(["--model_name_or_path", tiny_llama, "--data_path", str(data),
                *[f.replace(str(out), str(one)) for f in flags], "--per_device_train_batch_size", "8"])
    ddp, single = _weights(out), _weights(one)
    init = load(tiny_llama)[0].state_dict()
    moved = sum(((single[k] - init[k]) ** 2).sum().item() for k in single) ** 0.5
    diff = sum(((ddp[k] - single[k]) ** 2).sum().item() for k in single) ** 0.5
    print(f"weights: moved {moved:.3g}, DDP vs one process {diff:.3g}")
    assert moved > 1e-4 and diff < 0.01 * moved, (diff, moved)
