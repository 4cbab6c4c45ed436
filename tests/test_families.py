"""Today's model families (tests/_families.py): special tokens, truncation side, the prompt/response
boundary, chat templates, SentencePiece-only folders, and the dumped perplexity of each family
against the one-record-at-a-time reference."""

import json
import os
import sys
import types

import pytest
import torch

import train
import utils
from small2large import finetune, models, record_io, rendering
from small2large.rendering import BoundaryStats, RenderOptions, render_prompt, tokenize_records
from tests._dump_pplxs_helpers import max_rel_diff, one_thread_fixture, reference_pplxs
from tests._families import CHAT_RECORDS, FAMILIES, make_family
from tests.conftest import TINY_RECORDS
from utils import IGNORE_INDEX

BYTE_LEVEL_JOINING = ("llama3", "qwen2")  # pre-tokenizer joins ":" with the next word
TEMPLATE_END = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}  # families with a chat template


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread_fixture()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("families"))
    return {name: make_family(name, root) for name in FAMILIES}


def _load(path):
    margs = finetune.ModelArguments(path)
    targs = finetune.TrainingArguments(output_dir="/tmp/unused", model_max_length=256, report_to="none")
    model, tok = models.load_model_and_tokenizer(margs, targs)
    model.eval()
    return model, tok


def scored(ids, lab):
    return [t for t, y in zip(ids, lab) if y != IGNORE_INDEX]


def test_rendering_doctests():
    import doctest

    assert doctest.testmod(rendering).failed == 0


# ---------------------------------------------------------------- special tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_special_tokens_never_shrink_and_no_bos_unk_added(families, name):
    from transformers import AutoModelForCausalLM

    path = families[name]
    tok = models.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bos, unk, eos, pad = tok.bos_token, tok.unk_token, tok.eos_token, tok.pad_token
    n_tok, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old = model.get_input_embeddings().weight.detach().clone()
    added = models.add_missing_special_tokens(tok, model)
    assert (tok.bos_token, tok.unk_token, tok.eos_token) == (bos, unk, eos)  # never a bos or unk
    assert added == (pad is None) and tok.pad_token == (pad or "[PAD]")
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == max(rows, len(tok)) >= rows  # never shrinks; grows only when the new id does not fit
    assert torch.equal(w[:n_tok], old[:n_tok]) and torch.equal(w[len(tok):rows], old[len(tok):rows])
    if added:
        torch.testing.assert_close(w[tok.pad_token_id], old[:n_tok].mean(0), rtol=0, atol=1e-7)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    if name == "qwen2":  # pad = <|endoftext|> already, no bos/unk: nothing added, 512 rows kept for 569 ids
        assert added == 0 and rows > n_tok and "<s>" not in tok.get_vocab() and "<unk>" not in tok.get_vocab()
        assert tok.convert_ids_to_tokens(tok("<s>")["input_ids"]) != ["<s>"]  # the text "<s>" stays text
    if name == "phi":  # the new pad id fits inside the padded matrix: no resize
        assert added == 1 and w.shape[0] == rows > len(tok)
    if name in ("gpt2", "qwen2", "gemma"):
        assert tied


def test_pad_to_multiple_of_rounds_the_grown_matrix_up(families):
    from transformers import AutoModelForCausalLM

    path = families["gpt2"]  # 400 ids, 400 rows, no pad, tied
    tok = models.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    old = model.get_input_embeddings().weight.detach().clone()
    assert models.add_missing_special_tokens(tok, model, pad_to_multiple_of=64) == 1
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] == 448 and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(w[:400], old) and torch.equal(w[400], old.mean(0))
    margs = train.parse_args(["--data_path", __file__, "--output_dir", "/tmp/x", "--pad_embeddings_to_multiple_of",
                              "64"])[0]
    assert margs.pad_embeddings_to_multiple_of == 64


def _todays_add_missing_special_tokens(tokenizer, model):
    """The code path before this change (pad/eos/bos/unk added, resize to len(tokenizer), mean of all
    old rows into the last rows), kept here as the reference for Llama-2/OPT."""
    special = {}
    for key, default in (("pad_token", "[PAD]"), ("eos_token", "</s>"), ("bos_token", "<s>"), ("unk_token", "<unk>")):
        if getattr(tokenizer, key) is None:
            special[key] = default
    num_new = tokenizer.add_special_tokens(special) if special else 0
    if num_new:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                emb.weight[-num_new:] = emb.weight[:-num_new].mean(dim=0, keepdim=True)
    return num_new


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_llama_opt_embeddings_bit_identical_to_todays_code(arch, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(f"tiny_{arch}")
    pairs = []
    for fn in (models.add_missing_special_tokens, _todays_add_missing_special_tokens):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert fn(tok, model) == 1
        pairs.append((tok, model))
    (t1, m1), (t2, m2) = pairs
    assert t1.get_vocab() == t2.get_vocab() and t1.pad_token_id == t2.pad_token_id
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_zero3_writes_the_rows_inside_gathered_parameters(families, monkeypatch):
    """Under DeepSpeed ZeRO-3 (not installed here) the mean rows are written inside
    deepspeed.zero.GatheredParameters(..., modifier_rank=0): a fake records that it was entered."""
    from transformers import AutoModelForCausalLM

    events = []

    class FakeGathered:
        def __init__(self, params, modifier_rank=None):
            events.append(("init", [tuple(p.shape) for p in params], modifier_rank))

        def __enter__(self):
            events.append(("enter",))

        def __exit__(self, *exc):
            events.append(("exit",))

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=FakeGathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)
    path = families["phi"]  # the pad fits inside the matrix: only our write touches the rows
    tok = models.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert models.add_missing_special_tokens(tok, model) == 1
    rows = model.get_input_embeddings().weight.shape
    assert events == [("init", [tuple(rows), tuple(model.get_output_embeddings().weight.shape)], 0), ("enter",),
                      ("exit",)]
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: False)
    assert isinstance(models.embedding_gather([]), type(__import__("contextlib").nullcontext()))


def _todays_tokenize_records(records, tok, max_len):
    """The tokenization before this change (Alpaca: mask len(tok(prompt)); chat: the built-in template,
    prefix lengths), kept here as the reference for Llama-2/OPT-style tokenizers."""
    def enc(texts):
        return tok(texts, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]

    out_ids, out_lab = [], []
    for r in records:
        if "messages" not in r:
            src = rendering.format_prompt(r)
            ids = enc([src + r["output"] + tok.eos_token])[0]
            n = min(len(enc([src])[0]), len(ids))
            lab = [IGNORE_INDEX] * n + ids[n:]
        else:
            text, spans = "Below is a conversation between a user and an assistant.\n\n", []
            for m in r["messages"]:
                text += f"### {m['role'].capitalize()}:\n"
                if m["role"] == "assistant":
                    start = text
                    text += m["content"] + tok.eos_token
                    spans.append((start, text))
                    text += "\n\n"
                else:
                    text += m["content"] + "\n\n"
            ids = enc([text])[0]
            lab = [IGNORE_INDEX] * len(ids)
            for a_text, b_text in spans:
                a, b = (len(x) for x in enc([a_text, b_text]))
                lab[a:b] = ids[a:b]
        out_ids.append(ids)
        out_lab.append(lab)
    return out_ids, out_lab


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_llama_opt_tokenization_identical_to_todays_code(arch, tmp_path):
    """Default flags on the paper's kind of tokenizer (the quickstart's GPT-2-style byte-level BPE, trained
    on the sample data): every record tokenized and masked exactly as before, including the responses
    starting with '{"' whose boundary mismatches (':{"' is one pre-token): found, reported, kept."""
    from examples.make_tiny_models import corpus, train_bpe_tokenizer

    sample = record_io.load_records(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "sample_train.json"))
    tok = train_bpe_tokenizer(corpus(sample[:600]), 800, str(tmp_path / "tok"), arch=arch)
    records = sample[:300] + TINY_RECORDS + CHAT_RECORDS
    for max_len in (48, 256):  # 48 truncates most records
        stats = BoundaryStats()
        got = tokenize_records(records, tok, max_len, stats=stats)
        assert got == _todays_tokenize_records(records, tok, max_len)
        assert stats.mode == "paper"
    json_outputs = [i for i, r in enumerate(records) if r.get("output", "").startswith('{"')]
    assert json_outputs and set(stats.mismatched) <= set(json_outputs) and len(stats.mismatched) >= 5


# ---------------------------------------------------------------- truncation side


def test_left_truncation_in_the_tokenizer_config_is_overridden(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.truncation_side = "left"
    path = tmp_path / "left"
    tok.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    for f in os.listdir(tiny_llama):
        if f.endswith((".safetensors", "config.json")) and not os.path.exists(path / f):
            os.symlink(os.path.join(tiny_llama, f), path / f)
    r = TINY_RECORDS[3]
    full = AutoTokenizer.from_pretrained(tiny_llama)(rendering.format_prompt(r) + r["output"] + "</s>")["input_ids"]
    n = len(AutoTokenizer.from_pretrained(tiny_llama)(rendering.format_prompt(r))["input_ids"])
    _, loaded = _load(str(path))
    assert loaded.truncation_side == "right"
    left = AutoTokenizer.from_pretrained(path)
    assert left.truncation_side == "left"
    for t in (loaded, left):  # tokenize_records truncates on the right even with a "left" tokenizer
        ids, lab = tokenize_records([r], t, n + 3)
        assert ids[0] == full[: n + 3] and ids[0][0] == t.bos_token_id
        assert scored(ids[0], lab[0]) == full[n: n + 3]
    assert left.truncation_side == "left"  # restored


# ---------------------------------------------------------------- prompt/response boundary


@pytest.mark.parametrize("name", FAMILIES)
def test_boundary_mismatches_counted_and_fixed(families, name):
    _, tok = _load(families[name])
    eos = tok.eos_token
    paper = BoundaryStats()
    p_ids, p_lab = tokenize_records(TINY_RECORDS, tok, 256, RenderOptions("paper"), stats=paper)
    expected = [0, 2, 3, 6, 7, 9, 10] if name in BYTE_LEVEL_JOINING else []  # responses starting with a letter
    assert paper.mismatched == expected
    wrong = [i for i, r in enumerate(TINY_RECORDS) if tok.decode(scored(p_ids[i], p_lab[i])) != r["output"] + eos]
    assert wrong == expected  # the paper's boundary scores the wrong tokens exactly there
    if expected:
        with pytest.warns(UserWarning, match=f"{len(expected)} of 12 records"):
            tokenize_records(TINY_RECORDS, tok, 256, RenderOptions("paper"))
    auto = BoundaryStats()
    ids, lab = tokenize_records(TINY_RECORDS, tok, 256, RenderOptions("auto"), stats=auto)
    assert auto.mode == ("exact" if expected else "paper") and auto.fixed == len(expected)
    for i, r in enumerate(TINY_RECORDS):
        assert tok.decode(scored(ids[i], lab[i])) == r["output"] + eos  # exactly the response + eos
        prompt_text, prompt_ids = render_prompt(r, tok)
        assert prompt_text == rendering.format_prompt(r)
        k = len(prompt_ids)
        assert ids[i][:k] == prompt_ids and all(y == IGNORE_INDEX for y in lab[i][:k])  # generation sees these
        if i not in expected:
            assert (ids[i], lab[i]) == (p_ids[i], p_lab[i])  # where the prefix holds nothing changes


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", sorted(TEMPLATE_END))
def test_chat_template_scores_assistant_turns_and_end_marker(families, name):
    _, tok = _load(families[name])
    end = TEMPLATE_END[name]
    ids, lab = tokenize_records(CHAT_RECORDS, tok, 256)
    for r, x, y in zip(CHAT_RECORDS, ids, lab):
        assert x == tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]
        want = "".join(m["content"] + end for m in r["messages"] if m["role"] == "assistant")
        assert tok.decode(scored(x, y)) == want
        # each scored run ends on the marker; the token after it (ChatML's "\n", the next header) is not scored
        for j in range(len(y) - 1):
            if y[j] != IGNORE_INDEX and y[j + 1] == IGNORE_INDEX:
                assert tok.convert_ids_to_tokens(x[j]) == end
    if name == "qwen2":  # {% generation %}: the same mask as transformers' return_assistant_tokens_mask
        enc = tok.apply_chat_template(CHAT_RECORDS[0]["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert [y != IGNORE_INDEX for y in lab[0]] == [bool(m) for m in enc["assistant_masks"]]
    # the prompt for generation: every turn before the last answer, with the generation header
    text, p_ids = render_prompt(CHAT_RECORDS[0], tok)
    assert text == tok.apply_chat_template(CHAT_RECORDS[0]["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert ids[0][: len(p_ids)] == p_ids
    # an open conversation (ending in a user turn) is the prompt whole, not cut at an earlier answer
    open_text, open_ids = render_prompt({"messages": CHAT_RECORDS[0]["messages"][:4]}, tok)
    assert (open_text, open_ids) == (text, p_ids)
    # the built-in template on request; Alpaca records as a one-turn conversation on request
    b_ids, b_lab = tokenize_records(CHAT_RECORDS[:1], tok, 256, RenderOptions(chat_template="builtin"))
    assert "### Assistant:" in tok.decode(b_ids[0])
    assert tok.decode(scored(b_ids[0], b_lab[0])) == f"Paris{tok.eos_token}tenalp, the word reversed.{tok.eos_token}"
    a_ids, a_lab = tokenize_records(TINY_RECORDS, tok, 256, RenderOptions(alpaca_as_chat=True))
    for r, x, y in zip(TINY_RECORDS, a_ids, a_lab):
        assert tok.decode(scored(x, y)) == r["output"] + end
        assert "### Response" not in tok.decode(x)


@pytest.mark.parametrize("name", sorted(TEMPLATE_END))
def test_answers_that_also_occur_in_the_header_or_marker(families, name):
    """An answer such as "assistant", "end" or "id" also occurs in the role header or the marker: the
    content found is the one the end-of-turn marker follows."""
    _, tok = _load(families[name])
    end = TEMPLATE_END[name]
    for answer in ("assistant", "end", "id", "a"):
        rec = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": answer}]}
        ids, lab = tokenize_records([rec], tok, 256)
        assert tok.decode(scored(ids[0], lab[0])) == answer + end, answer


def test_generation_block_without_the_marker_still_scores_the_marker(families):
    from tests._families import CHATML_GENERATION_TEMPLATE

    _, tok = _load(families["qwen2"])
    inside = "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    outside = "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}"
    assert inside in CHATML_GENERATION_TEMPLATE
    tok.chat_template = CHATML_GENERATION_TEMPLATE.replace(inside, outside)
    ids, lab = tokenize_records(CHAT_RECORDS[:1], tok, 256)
    assert tok.decode(scored(ids[0], lab[0])) == "Paris<|im_end|>tenalp, the word reversed.<|im_end|>"


def test_chat_template_flag_without_a_template_is_a_user_error(families):
    _, tok = _load(families["gpt2"])
    with pytest.raises(utils.UserError, match="no chat template"):
        tokenize_records(CHAT_RECORDS, tok, 256, RenderOptions(chat_template="tokenizer"))
    ids, lab = tokenize_records(CHAT_RECORDS[:1], tok, 256)  # auto: the built-in template
    assert tok.decode(scored(ids[0], lab[0])) == "Paris<|endoftext|>tenalp, the word reversed.<|endoftext|>"
    text, p_ids = render_prompt(CHAT_RECORDS[0], tok)
    assert text.endswith("### User:\nReverse the word planet.\n\n### Assistant:\n") and ids[0][: len(p_ids)] == p_ids


def test_rendering_flags_reach_both_scripts(tiny_dataset):
    margs, dargs, targs = train.parse_args(["--data_path", tiny_dataset, "--output_dir", "/tmp/x", "--response_boundary",
                                            "exact", "--chat_template", "builtin", "--alpaca_as_chat", "True"])
    assert dargs.render_options() == RenderOptions("exact", "builtin", True)
    assert train.parse_args(["--data_path", tiny_dataset, "--output_dir", "/tmp/x"])[1].render_options() == RenderOptions()
    with pytest.raises(SystemExit):
        train.parse_args(["--data_path", tiny_dataset, "--output_dir", "/tmp/x", "--response_boundary", "offsets"])


# ---------------------------------------------------------------- SentencePiece-only folders and load errors


def test_sentencepiece_only_folder_loads_as_llama2(families):
    import sentencepiece as spm

    path = families["llama2"]
    assert sorted(f for f in os.listdir(path) if not f.endswith(".json")) == ["model.safetensors", "tokenizer.model"]
    _, tok = _load(path)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    for r in TINY_RECORDS:  # bos + SentencePiece's own ids (dummy prefix, byte fallback), as transformers 4 did
        text = rendering.format_prompt(r) + r["output"]
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "[PAD]")


def test_load_errors_are_one_line_and_name_what_is_missing(families, tmp_path, monkeypatch):
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    os.symlink(os.path.join(families["llama3"], "config.json"), no_tok / "config.json")
    with pytest.raises(utils.UserError, match="no tokenizer files"):
        models.load_tokenizer(str(no_tok))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in os.listdir(families["llama3"]):
        if not f.endswith(".safetensors"):
            os.symlink(os.path.join(families["llama3"], f), no_weights / f)
    with pytest.raises(utils.UserError, match="cannot load the model") as e:
        _load(str(no_weights))
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    for f in os.listdir(families["qwen2"]):
        if f != "tokenizer.json":
            os.symlink(os.path.join(families["qwen2"], f), broken / f)
    (broken / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(utils.UserError, match="cannot load the tokenizer"):
        models.load_tokenizer(str(broken))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if sentencepiece were not installed
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    with pytest.raises(utils.UserError, match="needs the 'sentencepiece' package") as e:
        models.load_tokenizer(families["llama2"])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- perplexity of every family


@pytest.mark.parametrize("name", FAMILIES)
def test_dumped_perplexity_equals_reference_for_each_family(families, name):
    from small2large.scoring import score_pplxs

    model, tok = _load(families[name])
    ids, lab = tokenize_records(TINY_RECORDS + CHAT_RECORDS, tok, 256)
    data = rendering.SupervisedData(ids, lab)
    got, stats = score_pplxs(model, data, tok.pad_token_id, max_tokens=400, progress=False)
    ref = reference_pplxs(model, ids, lab)
    assert stats.n_batches > 1 and max_rel_diff(got, ref) < 1e-5
    assert all(p > 1.5 for p in ref)
    end = TEMPLATE_END.get(name, tok.eos_token)  # the template's end-of-turn marker, else the built-in eos
    for r, x, y in zip(TINY_RECORDS + CHAT_RECORDS, ids, lab):
        want = r["output"] + tok.eos_token if "output" in r else "".join(
            m["content"] + end for m in r["messages"] if m["role"] == "assistant")
        assert tok.decode(scored(x, y)) == want
