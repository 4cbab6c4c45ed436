"""The supervised (Alpaca-prompt) data shared by train.py and dump_pplxs.py (utils.py):
templates, prompt masking, eos, truncation, chat records, pad token + embedding resize, file formats."""

import gzip
import json

import pytest
import torch
from conftest import TINY_RECORDS

from small2large import batching, models, rendering

# The Stanford Alpaca templates, written out independently of rendering.PROMPT_DICT.
from small2large.rendering import make_supervised_data, tokenize_records
from utils import IGNORE_INDEX

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def scored(labels):
    return [t for t in labels if t != IGNORE_INDEX]


def test_templates_are_the_stanford_alpaca_strings():
    assert rendering.PROMPT_DICT["prompt_input"] == ALPACA_WITH_INPUT
    assert rendering.PROMPT_DICT["prompt_no_input"] == ALPACA_NO_INPUT
    r = {"instruction": "Add {x}.", "input": "1 and 2", "output": "3"}
    assert rendering.format_prompt(r) == ALPACA_WITH_INPUT.replace("{instruction}", "Add {x}.").replace("{input}", "1 and 2")
    r = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert rendering.format_prompt(r) == ALPACA_NO_INPUT.replace("{instruction}", "Say hi.")


def test_labels_are_response_plus_eos_and_prompt_is_masked(tok):
    ids, labels = tokenize_records(TINY_RECORDS, tok, 256)
    for r, x, y in zip(TINY_RECORDS, ids, labels):
        assert len(x) == len(y)
        n_prompt = len(tok(rendering.format_prompt(r))["input_ids"])
        assert y[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the prompt tokenized alone is masked
        assert y[n_prompt:] == x[n_prompt:]  # labels equal input_ids where scored
        assert x[-1] == tok.eos_token_id  # eos appended
        assert tok.decode(scored(y)) == r["output"] + tok.eos_token  # exactly the response + eos is scored
        assert x == tok(rendering.format_prompt(r) + r["output"] + tok.eos_token)["input_ids"]


@pytest.mark.parametrize("output", ["The sea is wide, deep and always moving under the wind.", "42", "tenalp"])
def test_changing_only_the_prompt_never_changes_the_scored_tokens(tok, output):
    prompts = [
        {"instruction": "Reverse the word.", "input": "planet"},
        {"instruction": "Reverse the word.", "input": ""},
        {"instruction": "Write a short sentence about the sea.", "input": ""},
        {"instruction": "Summarise the text.", "input": "Cats sleep a lot. They also like to play at night."},
        {"instruction": "x", "input": "y z"},
    ]
    records = [{**p, "output": output} for p in prompts]
    ids, labels = tokenize_records(records, tok, 256)
    ref = scored(labels[0])
    assert len(ref) > 1
    for x, y in zip(ids, labels):
        k = len(scored(y))
        assert scored(y) == ref and k == len(ref)
        assert y[-k:] == x[-k:] and all(t == IGNORE_INDEX for t in y[:-k])  # scored tokens are the suffix


def test_truncation_at_model_max_length(tok):
    r = TINY_RECORDS[3]  # long response
    n_prompt = len(tok(rendering.format_prompt(r))["input_ids"])
    full_ids, full_labels = tokenize_records([r], tok, 256)
    assert len(full_ids[0]) > n_prompt + 3
    ids, labels = tokenize_records([r], tok, n_prompt + 3)
    assert len(ids[0]) == n_prompt + 3
    assert ids[0] == full_ids[0][: n_prompt + 3]  # right truncation, no eos forced in
    assert ids[0][-1] != tok.eos_token_id
    assert scored(labels[0]) == full_ids[0][n_prompt: n_prompt + 3]


@pytest.mark.parametrize("extra", [-5, 0])
def test_prompt_filling_the_window_leaves_no_scored_token(tok, extra):
    long_r = {"instruction": "Summarise the text.", "input": "Cats sleep a lot. " * 20, "output": "Cats sleep."}
    n_prompt = len(tok(rendering.format_prompt(long_r))["input_ids"])
    max_len = n_prompt + extra  # the prompt is longer than, or exactly, the window
    ids, labels = tokenize_records([long_r, TINY_RECORDS[7]], tok, max_len)
    assert len(ids[0]) == max_len and labels[0] == [IGNORE_INDEX] * max_len
    assert scored(labels[1])  # the short record keeps its response
    data = rendering.SupervisedData(ids, labels)
    assert data.n_fully_truncated == 1 and len(data) == 2


def _hand_chat_labels(messages, tok, max_length):
    """Independent reconstruction: render the documented chat template, then score exactly the
    tokens whose character span lies inside an assistant turn's content + eos (offset mapping)."""
    text, spans = "Below is a conversation between a user and an assistant.\n\n", []
    for m in messages:
        text += f"### {m['role'].capitalize()}:\n"
        start = len(text)
        text += m["content"]
        if m["role"] == "assistant":
            text += tok.eos_token
            spans.append((start, len(text)))
        text += "\n\n"
    enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(t if inside else IGNORE_INDEX)
    return enc["input_ids"], labels, spans, text


@pytest.mark.parametrize("max_length", [256, 60])
def test_chat_records_score_only_assistant_content_and_eos(tok, max_length):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Give the capital of France."},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Reverse the word planet."},
        {"role": "assistant", "content": "tenalp, the word reversed."},
    ]
    ids, labels = tokenize_records([{"messages": messages}], tok, max_length)
    hand_ids, hand_labels, spans, text = _hand_chat_labels(messages, tok, max_length)
    assert ids[0] == hand_ids and labels[0] == hand_labels
    if max_length == 256:
        assert tok.decode(scored(labels[0])) == "Paris</s>tenalp, the word reversed.</s>"
        assert len(ids[0]) < max_length
    else:
        assert len(ids[0]) == max_length


def test_mixed_chat_and_alpaca_keep_dataset_order(tok):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    recs = [TINY_RECORDS[0], chat, TINY_RECORDS[1]]
    ids, labels = tokenize_records(recs, tok, 256)
    ids_a, labels_a = tokenize_records([TINY_RECORDS[0], TINY_RECORDS[1]], tok, 256)
    ids_c, labels_c = tokenize_records([chat], tok, 256)
    assert ids == [ids_a[0], ids_c[0], ids_a[1]] and labels == [labels_a[0], labels_c[0], labels_a[1]]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_pad_token_added_and_new_rows_are_the_mean(arch, tiny_llama, tiny_opt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama if arch == "llama" else tiny_opt
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert tok.pad_token is None
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    v = old_in.shape[0]
    assert models.add_missing_special_tokens(tok, model) == 1
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == v == len(tok) - 1
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == (v + 1, old_in.shape[1]) and new_out.shape == (v + 1, old_out.shape[1])
    assert torch.equal(new_in[:v], old_in) and torch.equal(new_out[:v], old_out)
    torch.testing.assert_close(new_in[v], old_in.mean(0), rtol=0, atol=1e-7)
    torch.testing.assert_close(new_out[v], old_out.mean(0), rtol=0, atol=1e-7)
    assert model.config.vocab_size == v + 1
    # the softmax changed: the pad logit is h . mean(rows) = the mean of the other logits, at every position
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape[-1] == v + 1
    torch.testing.assert_close(logits[0, :, v], logits[0, :, :v].mean(-1), rtol=1e-5, atol=1e-5)
    # a tokenizer that already has every special token is left alone
    assert models.add_missing_special_tokens(tok, model) == 0
    assert model.get_input_embeddings().weight.shape[0] == v + 1


def test_jsonl_json_and_gz_give_the_same_tokens(tok, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(TINY_RECORDS, indent=4))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in TINY_RECORDS) + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in TINY_RECORDS))
    datas = [make_supervised_data(str(tmp_path / n), tok, 256) for n in ("a.json", "a.jsonl", "a.jsonl.gz")]
    assert len(datas[0]) == len(TINY_RECORDS)
    for d in datas[1:]:
        assert d.input_ids == datas[0].input_ids and d.labels == datas[0].labels


def test_dataset_and_collator(tok):
    ids, labels = tokenize_records(TINY_RECORDS[:3], tok, 256)
    ds = batching.SupervisedDataset(rendering.SupervisedData(ids, labels))
    assert len(ds) == 3 and ds[1]["input_ids"].dtype == torch.long and ds[1]["labels"].tolist() == labels[1]
    pad = tok.eos_token_id  # pad == eos must not mask the real eos
    batch = batching.DataCollatorForSupervisedDataset(pad)([ds[i] for i in range(3)])
    n = max(map(len, ids))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    for j in range(3):
        k = len(ids[j])
        assert batch["input_ids"][j, :k].tolist() == ids[j] and (batch["input_ids"][j, k:] == pad).all()
        assert batch["labels"][j, :k].tolist() == labels[j] and (batch["labels"][j, k:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][j].tolist() == [1] * k + [0] * (n - k)
