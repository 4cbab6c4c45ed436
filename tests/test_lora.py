"""LoRA (--lora_r) in both scripts, on CPU: a chat + Alpaca dump run on a Qwen2-like model (tied,
padded embeddings, ChatML template) whose dumps equal the one-record reference of the base model (P0)
and of the adapted model (P1); a train.py run that saves the adapter and the merged model."""

import json
import os

import pytest
import torch
from transformers import TrainerCallback

import dump_pplxs
import train
from small2large import finetune, models, scoring
from small2large.dumps import load_pplxs
from small2large.rendering import tokenize_records
from tests._dump_pplxs_helpers import max_rel_diff, one_thread_fixture, reference_pplxs
from tests._families import CHAT_RECORDS, make_family
from tests.conftest import TINY_RECORDS

RECORDS = TINY_RECORDS[:6] + CHAT_RECORDS


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_family("qwen2", str(tmp_path_factory.mktemp("lora")))


@pytest.fixture()
def mixed_dataset(tmp_path):
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps(RECORDS, indent=4))
    return str(p)


def _argv(model, data, tmp, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(tmp / "out"),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "3", "--learning_rate", "5e-2",
            "--model_max_length", "256", "--seed", "42", "--report_to", "none", "--disable_tqdm", "True",
            "--save_strategy", "no", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", *extra]


class _KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_lora_dump_run_scores_the_adapted_model(qwen2, mixed_dataset, tmp_path, capsys):
    keep = _KeepModel()
    dump_pplxs.main(_argv(qwen2, mixed_dataset, tmp_path, "--dump_dir", str(tmp_path / "dumps")), callbacks=[keep])
    err = capsys.readouterr().err
    assert "3 of 9 records" in err and "3 tokenized prompt and response separately" in err  # reported, not silent
    assert "LoRA r=4:" in err
    p0, p1 = (load_pplxs(tmp_path / "dumps" / n) for n in ("epoch-pre.pkl", "epoch-1.pkl"))
    adapted = keep.model
    assert type(adapted).__name__ == "PeftModelForCausalLM"
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert scoring._supports_logits_to_keep(adapted)  # scored-positions-only logits through peft too
    base, tok = models.load_model_and_tokenizer(finetune.ModelArguments(qwen2), finetune.TrainingArguments(
        output_dir=str(tmp_path / "x"), model_max_length=256, report_to="none"))
    ids, lab = tokenize_records(RECORDS, tok, 256)
    base.eval()
    assert max_rel_diff(list(p0), reference_pplxs(base, ids, lab)) < 1e-5  # LoRA's B = 0: P0 is the base model's
    adapted.eval()
    assert max_rel_diff(list(p1), reference_pplxs(adapted, ids, lab)) < 1e-5  # P1: the adapted model
    assert p1.mean() < 0.9 * p0.mean()
    # the base weights did not move: only the adapters learned
    base_sd = base.state_dict()
    for n, w in adapted.get_base_model().state_dict().items():
        key = n.replace(".base_layer", "")
        if "lora_" not in n and key in base_sd:
            assert torch.equal(w, base_sd[key]), n


def test_lora_train_saves_adapter_and_merged_model(qwen2, mixed_dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train.main(_argv(qwen2, mixed_dataset, tmp_path, "--merge_lora", "True"))
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert "model.safetensors" not in os.listdir(out)  # the adapter alone, not a copy of the base
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base, _ = models.load_model_and_tokenizer(finetune.ModelArguments(qwen2), finetune.TrainingArguments(
        output_dir=str(tmp_path / "x"), model_max_length=256, report_to="none"))
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, rtol=1e-4, atol=1e-5)
        with adapted.disable_adapter():
            assert not torch.allclose(merged(x).logits, adapted(x).logits, atol=1e-4)  # training changed the model
    assert merged.get_input_embeddings().weight.shape[0] == 640  # Qwen2-like padded rows kept


def test_lora_flags_are_checked():
    with pytest.raises(SystemExit):
        train.parse_args(["--data_path", __file__, "--output_dir", "/tmp/x", "--merge_lora", "True"])
    with pytest.raises(SystemExit):
        train.parse_args(["--data_path", __file__, "--output_dir", "/tmp/x", "--lora_r", "-1"])
    m = finetune.ModelArguments("x", lora_r=8, lora_target_modules="q_proj, v_proj")
    assert m.lora_config().target_modules == {"q_proj", "v_proj"} and m.lora_config().r == 8


def test_unknown_lora_target_module_is_a_user_error(qwen2, tmp_path):
    from utils import UserError

    margs = finetune.ModelArguments(qwen2, lora_r=4, lora_target_modules="no_such_proj")
    targs = finetune.TrainingArguments(output_dir=str(tmp_path), model_max_length=64, report_to="none")
    with pytest.raises(UserError, match="--lora_target_modules no_such_proj"):
        models.load_model_and_tokenizer(margs, targs)
    margs = finetune.ModelArguments(qwen2, lora_r=4, lora_target_modules="q_proj,v_proj")
    model, _ = models.load_model_and_tokenizer(margs, targs)
    names = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}


@pytest.mark.slow
def test_evaluate_loads_a_lora_output_folder(tiny_llama, tmp_path):
    """tiny Llama has no pad token: training adds [PAD] and peft saves the resized embed_tokens/lm_head with
    the adapter, which AutoModelForCausalLM.from_pretrained(adapter folder) cannot load. evaluate.py loads
    base + adapter (train.load_adapted) and answers as the merged model does."""
    import evaluate

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(TINY_RECORDS[:6], indent=4))
    train.main(_argv(tiny_llama, str(data), tmp_path, "--merge_lora", "True"))
    out = tmp_path / "out"
    assert "adapter_config.json" in os.listdir(out)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(TINY_RECORDS[6:10]))
    res = evaluate.main(["--models", str(out), str(out / "merged"), "--names", "adapter", "merged", "--prompts",
                         str(prompts), "--max_new_tokens", "5", "--output_dir", str(tmp_path / "eval"),
                         "--no_progress"])
    rows = {}
    for m in res["models"]:
        with open(m["generations"], encoding="utf-8") as f:
            rows[m["name"]] = [json.loads(line) for line in f]
    assert [r["new_tokens"] for r in rows["adapter"]] == [r["new_tokens"] for r in rows["merged"]]
    assert sum(r["new_tokens"] for r in rows["adapter"]) > 0  # it generated
    assert [r["response"] for r in rows["adapter"]] == [r["response"] for r in rows["merged"]]
