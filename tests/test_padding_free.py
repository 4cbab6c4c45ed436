"""--padding_free (train.py and dump_pplxs.py): a batch packed into one row gives the loss and the
gradients of the same batch right-padded, through the Trainer's own loss scaling (num_items_in_batch,
gradient accumulation), for Llama, Mistral and Qwen2; models that cannot take packed sequences are
refused; a dump_pplxs.py run gives the same dumps with and without it."""

import copy
import math

import pytest
import torch

import train
from small2large import finetune, models
from small2large.batching import DataCollatorForSupervisedDataset, SupervisedDataset
from small2large.models import add_missing_special_tokens
from small2large.rendering import SupervisedData, tokenize_records
from tests._dump_pplxs_helpers import one_thread_fixture
from tests.conftest import TINY_RECORDS
from utils import IGNORE_INDEX, UserError


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


def _tiny(family: str, tok, attn: str = "sdpa"):
    """A random-initialised float32 causal LM of ``family`` sized for ``tok`` (pad token added as the paper does)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg = {"llama": lambda: LlamaConfig(**common),
           "mistral": lambda: MistralConfig(**common, sliding_window=16),  # narrower than most records
           "qwen2": lambda: Qwen2Config(**common)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    add_missing_special_tokens(tok, model)
    return model


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, padding_side="right")


def _args(tmp_path, padding_free, use_cache=False):
    return finetune.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                   gradient_accumulation_steps=2, report_to="none", use_cpu=True,
                                   padding_free=padding_free, use_cache=use_cache)


def _step(model0, tok, data, args):
    """One optimizer step's worth of forward/backward through the Trainer (two micro-batches of 4 records,
    num_items_in_batch counted by the Trainer): returns (summed loss, {name: gradient}, the batches)."""
    model = copy.deepcopy(model0)
    trainer = finetune.build_trainer(model, tok, data, args)
    ds, collate = SupervisedDataset(data), trainer.data_collator
    batches = [collate([ds[i] for i in range(s, s + 4)]) for s in (0, 4)]
    samples, n_items = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
    loss = sum(float(trainer.training_step(model, b, n_items)) for b in samples)
    return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, batches


def _token_average(model, data, n):
    """Reference: the mean next-token cross-entropy over every label token of the first n records, one record
    at a time (no padding, no packing)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, lab in zip(data.input_ids[:n], data.labels[:n]):
            logits = model(torch.tensor([ids])).logits[0, :-1]
            tgt = torch.tensor(lab[1:])
            keep = tgt != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("family,attn,use_cache", [("llama", "sdpa", False), ("llama", "eager", False),
                                                   ("mistral", "sdpa", False), ("qwen2", "sdpa", False),
                                                   ("llama", "sdpa", True)])
def test_packed_batch_has_the_padded_loss_and_gradients(family, attn, use_cache, tiny_llama, tmp_path):
    """use_cache=True: the Trainer leaves the model's cache on (--use_cache True); with a cache transformers
    ignores packing, so the packed batch turns it off itself."""
    tok = _tokenizer(tiny_llama)
    model0 = _tiny(family, tok, attn)
    data = SupervisedData(*tokenize_records(TINY_RECORDS[:8], tok, 256))
    loss_pad, g_pad, b_pad = _step(model0, tok, data, _args(tmp_path, False, use_cache))
    loss_pk, g_pk, b_pk = _step(model0, tok, data, _args(tmp_path, True, use_cache))
    # the packed batches: one row each, no padding, positions restart per record, same records in order
    lens = [len(x) for x in data.input_ids]
    assert [tuple(b["input_ids"].shape) for b in b_pk] == [(1, sum(lens[:4])), (1, sum(lens[4:]))]
    assert "attention_mask" not in b_pk[0] and b_pk[0]["use_cache"] is False
    assert b_pk[0]["position_ids"][0].tolist() == [t for n in lens[:4] for t in range(n)]
    assert b_pk[0]["input_ids"][0].tolist() == [t for x in data.input_ids[:4] for t in x]
    assert sum(int(b["attention_mask"].sum()) for b in b_pad) == sum(lens)
    assert sum(b["input_ids"].numel() for b in b_pad) > sum(lens)  # the padded batches do hold padding
    # the Trainer's loss over the accumulated step is the token average over all 8 records, both ways
    ref = _token_average(model0.eval(), data, 8)
    assert loss_pad == pytest.approx(ref, rel=1e-5)
    assert loss_pk == pytest.approx(loss_pad, rel=1e-5)
    assert g_pk.keys() == g_pad.keys() and len(g_pad) > 10
    for k in g_pad:
        rel = float((g_pk[k] - g_pad[k]).norm() / g_pad[k].norm())
        assert rel < 1e-5, (k, rel)


def test_first_label_of_each_record_is_never_a_target(tiny_llama):
    """Even when a record's first label is not masked, the packed row does not train the previous record's
    last token to predict it; the padded batch never predicts position 0 either."""
    collate = DataCollatorForSupervisedDataset(0, padding_free=True)
    b = collate([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([5, 6, 7])},
                 {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([8, 9])}])
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_models_that_cannot_pack_are_refused(tiny_opt, tiny_dataset, tmp_path):
    # OPT (learned absolute positions from the attention mask) through train.py, as a user runs it
    argv = ["--model_name_or_path", tiny_opt, "--data_path", tiny_dataset, "--output_dir", str(tmp_path / "o"),
            "--per_device_train_batch_size", "4", "--max_steps", "1", "--report_to", "none",
            "--save_strategy", "no", "--padding_free"]
    with pytest.raises(UserError, match="--padding_free: OPTForCausalLM .*drop --padding_free"):
        train.main(argv)
    assert not (tmp_path / "o" / "model.safetensors").exists()
    opt = models.load_model_and_tokenizer(finetune.ModelArguments(tiny_opt), _args(tmp_path, True))[0]
    opt.train()
    with pytest.raises(UserError, match="largest logit difference"):
        models.check_padding_free(opt)
    assert opt.training  # the probe restores the mode it found
    # without --padding_free the same OPT trains as before
    train.main(argv[:-1])


def test_models_that_pack_pass_the_probe(tiny_llama):
    """Llama, Mistral, Qwen2 and also GPT-2: its absolute position embeddings are read from the position ids
    and its mask is built from them in transformers 5.23, so it packs correctly (measured, not assumed)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = _tokenizer(tiny_llama)
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    for model in (_tiny("llama", tok).eval(), _tiny("mistral", tok, "eager"), _tiny("qwen2", tok), gpt2):
        was = model.training
        models.check_padding_free(model)   # no error
        assert model.training == was


@pytest.mark.slow
def test_dump_pplxs_gives_the_same_dumps_padding_free(tiny_llama, tiny_dataset, tmp_path):
    import dump_pplxs
    from small2large.dumps import load_pplxs

    def run(tag, *extra):
        argv = ["--model_name_or_path", tiny_llama, "--data_path", tiny_dataset,
                "--output_dir", str(tmp_path / tag / "out"), "--dump_dir", str(tmp_path / tag / "dumps"),
                "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "256", "--seed", "42", "--report_to", "none",
                "--disable_tqdm", "True", "--save_strategy", "no", *extra]
        dump_pplxs.main(argv)
        return [load_pplxs(tmp_path / tag / "dumps" / f"epoch-{e}.pkl") for e in ("pre", 1)]

    pre_a, p1_a = run("padded")
    pre_b, p1_b = run("packed", "--padding_free")
    assert max(abs(a - b) / b for a, b in zip(pre_a, pre_b)) < 1e-5
    assert p1_a.mean() < 0.9 * pre_a.mean()          # training moved the model ...
    # ... the same way with and without packing (measured: 1e-6; positions not restarting, i.e. records
    # attending to each other, give 4e-2)
    rel = max(abs(a - b) / b for a, b in zip(p1_a, p1_b))
    assert rel < 1e-3, rel
    assert not math.isnan(rel)


@pytest.mark.slow
def test_two_processes_same_losses_and_weights_padding_free(tiny_llama, tiny_dataset, tmp_path):
    """torchrun, 2 CPU processes (DDP over gloo), gradient accumulation 2: the Trainer counts the label tokens
    across processes (num_items_in_batch); the logged losses and gradient norms (both scale with that count)
    and the trained weights are those of the padded run."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import ROOT

    def run(tag, *extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        out = tmp_path / tag
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "train.py", "--model_name_or_path", tiny_llama, "--data_path", tiny_dataset, "--output_dir", str(out),
               "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
               "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
               "--logging_steps", "1", "--seed", "42", *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        return logs, load_file(str(out / "model.safetensors"))

    logs_a, w_a = run("padded")
    logs_b, w_b = run("packed", "--padding_free")
    assert len(logs_a) == len(logs_b) >= 4   # one log per optimizer step, 2 epochs
    for a, b in zip(logs_a, logs_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w0 = load_file(os.path.join(tiny_llama, "model.safetensors"))
    moved = max(float((w_a[k] - w0[k]).abs().max()) for k in w0 if w0[k].shape == w_a[k].shape)
    diff = max(float((w_a[k] - w_b[k]).abs().max()) for k in w_a)
    assert diff < 1e-3 * moved, (diff, moved)


def test_bench_train_runs_and_both_ways_train_alike():
    """bench/bench_train.py on a few sample records: the padded and the packed run see the same batches and log
    the same per-step losses."""
    from bench import bench_train

    res = bench_train.main(["--n_records", "16", "--vocab_size", "400", "--hidden_size", "32", "--num_layers", "1",
                            "--num_heads", "2", "--warmup_steps", "1", "--threads", "1"])
    assert res["max_rel_loss_diff"] < 1e-5
    assert 0.05 < res["padding_paper"] < 0.9


def test_bench_train_token_budget_at_the_papers_records_per_step():
    """bench/bench_train.py --max_tokens_per_micro_batch: the paper's batches of 4 x 4 accumulation steps
    against the same 16 records per step regrouped under a 1024-token budget: fewer micro-batches, the same per-step losses."""
    from bench import bench_train

    res = bench_train.main(["--n_records", "64", "--vocab_size", "400", "--hidden_size", "32", "--num_layers", "1",
                            "--num_heads", "2", "--warmup_steps", "1", "--threads", "1",
                            "--gradient_accumulation_steps", "4", "--max_tokens_per_micro_batch", "1024"])
    assert res["max_rel_loss_diff"] < 1e-5
    assert 0.05 < res["padding_paper"] < 0.9 and res["padding_packed"] < res["padding_paper"]
    assert 1 <= res["micro_batches_packed"] < 4   # 16 records of ~60 tokens: a few packed micro-batches, not 4


def test_probe_is_skipped_under_deepspeed_zero3(tiny_llama, monkeypatch):
    """ZeRO-3 partitions the parameters: each rank's local tensors are empty (size 0, not meta). The probe
    cannot run on them and must not refuse the model; it is skipped as utils.embedding_gather decides."""
    import transformers.integrations

    model = _tiny("llama", _tokenizer(tiny_llama))
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)   # what a ZeRO-3 rank holds outside GatheredParameters
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(UserError, match="--padding_free"):   # ZeRO-3 off: empty weights cannot run the probe
        models.check_padding_free(model)
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    models.check_padding_free(model)   # no error, nothing run
