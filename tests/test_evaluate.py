"""evaluate.py (step 5): the aggregation, winning score and bootstrap interval on hand-made verdicts;
the OpenAI-compatible judge against a local HTTP server (retries, verdict cache, resume); the hf: judge,
rendering, greedy generation and caches with tiny local models; exact match and gold perplexity on the
shipped held-out sample; every bad input."""

import http.server
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest
from conftest import ROOT, TINY_RECORDS

import evaluate
from small2large import generation
from small2large import judge as judging

# ----------------------------------------------------------------------------------------
from small2large.rendering import tokenize_records
from utils import IGNORE_INDEX, UserError, run_cli

# Pure maths: aggregation, winning score, interval


def test_aggregation_on_hand_made_verdicts():
    # (A shown first, B shown first) -> outcome for A, strict and lenient rules
    cases = [
        (("first", "second"), "win", "win"),      # both orders prefer A
        (("second", "first"), "lose", "lose"),    # both orders prefer B
        (("first", "first"), "tie", "tie"),       # position bias: always the first answer
        (("second", "second"), "tie", "tie"),     # position bias: always the second answer
        (("tie", "tie"), "tie", "tie"),
        (("first", "tie"), "tie", "win"),         # A once, tie once
        (("tie", "first"), "tie", "lose"),        # tie once, B (shown first) once
        (("second", None), "failed", "failed"),   # a judge failure is never a tie
        ((None, None), "failed", "failed"),
    ]
    for (ab, ba), strict, lenient in cases:
        assert judging.aggregate(ab, ba) == strict, (ab, ba)
        assert judging.aggregate(ab, ba, "lenient") == lenient, (ab, ba)
    outcomes = [judging.aggregate(ab, ba) for (ab, ba), _, _ in cases]
    # win 1, lose 1, tie 5, failed 2 -> (1 - 1) / 7 + 1
    assert judging.winning_score(outcomes) == 1.0
    assert judging.winning_score(["win"] * 3 + ["lose"] + ["tie"] * 4 + ["failed"]) == 1.25  # (3-1)/8 + 1
    assert judging.winning_score(["lose", "lose"]) == 0.0 and judging.winning_score(["win"]) == 2.0


def _reference_bootstrap(values, n, seed):
    """One resample at a time, with the same generator calls as bootstrap_interval's chunks."""
    rng = np.random.default_rng(seed)
    x = np.asarray(values, dtype=float)
    means = []
    chunk = 1000
    for start in range(0, n, chunk):
        draws = rng.integers(0, len(x), size=(min(chunk, n - start), len(x)))
        for row in draws:
            means.append(sum(x[i] for i in row) / len(x))
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_bootstrap_interval_against_values_by_hand():
    # 8 wins and 2 ties: the resampled number of wins is Binomial(10, 0.8); P(k <= 4) = 0.006 and
    # P(k <= 5) = 0.033 bracket 2.5%, and P(k = 10) = 0.107 > 2.5%: the winning score's interval is
    # [5/10 + 1, 10/10 + 1] = [1.5, 2.0] around 1.8.
    vals = [judging.OUTCOME_VALUE[o] for o in ["win"] * 8 + ["tie"] * 2]
    lo, hi = judging.bootstrap_interval(vals, 10000, seed=42)
    assert (lo + 1, hi + 1) == (1.5, 2.0)
    assert judging.winning_score(["win"] * 8 + ["tie"] * 2) == pytest.approx(1.8)
    # 5 wins and 5 losses: mean = (2k - 10)/10 with k ~ Binomial(10, 0.5); P(k <= 1) = 0.011 and
    # P(k <= 2) = 0.055 bracket 2.5%: interval [2 * 2/10 - 1 + 1, 2 * 8/10 - 1 + 1] = [0.4, 1.6]
    lo, hi = judging.bootstrap_interval([1] * 5 + [-1] * 5, 10000, seed=7)
    assert (round(lo + 1, 12), round(hi + 1, 12)) == (0.4, 1.6)
    # the same numbers as a one-resample-at-a-time loop, for an uneven case and another seed
    vals = [1, 0, 0, -1, 1, 1, 0, 1, -1, 1, 0]
    assert judging.bootstrap_interval(vals, 3500, seed=3) == pytest.approx(_reference_bootstrap(vals, 3500, 3),
                                                                            abs=1e-12)
    # the interval depends on the seed and on nothing else
    assert judging.bootstrap_interval(vals, 3500, seed=3) == judging.bootstrap_interval(vals, 3500, seed=3)


# ----------------------------------------------------------------------------------------
# Rendering: the prompt the model sees equals the prefix training masks

CHAT_RECORDS = [
    {"messages": [{"role": "user", "content": "Name a primary colour."},
                  {"role": "assistant", "content": "Red is a primary colour."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Add the two numbers: 12 and 30"},
                  {"role": "assistant", "content": "42"},
                  {"role": "user", "content": "And 7 times 8?"},
                  {"role": "assistant", "content": "56"}]},
]


def _last_response_start(labels):
    """Start of the last run of scored labels: the tokens before it are what the model saw."""
    pos = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    start = pos[-1]
    while start - 1 in pos:
        start -= 1
    return start


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_rendering_equals_training(arch, tiny_llama, tiny_opt):
    path = tiny_llama if arch == "llama" else tiny_opt
    _, tok = generation.load_model(path, 512, "cpu", __import__("torch").float32)  # train.py's loading
    records = [dict(r) for r in TINY_RECORDS] + CHAT_RECORDS
    ids, labels = tokenize_records(records, tok, 512)
    for rec, x, lab in zip(records, ids, labels):
        a = _last_response_start(lab)
        assert generation.prompt_ids(rec, tok) == x[:a], rec
    # a chat prompt without its answer renders the same as with it
    open_chat = {"messages": CHAT_RECORDS[1]["messages"][:-1]}
    assert generation.prompt_ids(open_chat, tok) == generation.prompt_ids(CHAT_RECORDS[1], tok)


# ----------------------------------------------------------------------------------------
# Generation and its cache


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(path, obj, jsonl=False):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.write("".join(json.dumps(r) + "\n" for r in obj))
        else:
            json.dump(obj, f, indent=4)
    return str(path)


@pytest.mark.slow
def test_greedy_generation_deterministic_and_cached(tiny_llama, tiny_opt, tmp_path, capsys):
    import torch

    prompts = _write(tmp_path / "p.json", TINY_RECORDS)
    common = ["--prompts", prompts, "--max_new_tokens", "6", "--no_progress"]
    out = str(tmp_path / "eval")
    r1 = evaluate.main(["--models", tiny_llama, "--output_dir", out, "--batch_size", "5", *common])
    gen_file = r1["models"][0]["generations"]
    rows = _rows(gen_file)
    assert [r["index"] for r in rows] == list(range(len(TINY_RECORDS)))
    # reference: each prompt alone, unpadded, model.generate greedy
    model, tok = generation.load_model(tiny_llama, 512, "cpu", torch.float32)
    for rec, row in zip(TINY_RECORDS, rows):
        ids = generation.prompt_ids(dict(rec), tok)
        gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        assert row["response"] == tok.decode(gen, skip_special_tokens=True).strip()
        assert row["new_tokens"] == len(gen) and row["gold"] == rec["output"]
    # greedy and batch-independent: another folder, another batch size, the same responses
    r2 = evaluate.main(["--models", tiny_llama, "--output_dir", str(tmp_path / "eval2"), "--batch_size", "12", *common])
    rows2 = _rows(r2["models"][0]["generations"])
    assert [r["response"] for r in rows2] == [r["response"] for r in rows]
    # adding a model regenerates nothing for the first one
    mtime = os.path.getmtime(gen_file)
    capsys.readouterr()
    r3 = evaluate.main(["--models", tiny_llama, tiny_opt, "--output_dir", out, *common])
    log = capsys.readouterr().out
    assert f"[tiny-llama] generations reused: {gen_file}" in log and "loading " + tiny_llama not in log
    assert "loading " + tiny_opt in log
    assert os.path.getmtime(gen_file) == mtime and r3["models"][0]["generations"] == gen_file
    # other generation settings: a new cache entry
    r4 = evaluate.main(["--models", tiny_llama, "--output_dir", out, *common[:3], "7", "--no_progress"])
    assert r4["models"][0]["generations"] != gen_file
    # a changed model folder: a new cache entry too
    changed = str(tmp_path / "changed")
    shutil.copytree(tiny_llama, changed)
    with open(os.path.join(changed, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["rms_norm_eps"] = 1e-5
    _write(os.path.join(changed, "config.json"), cfg)
    assert generation.model_identity(changed) != generation.model_identity(tiny_llama)


# ----------------------------------------------------------------------------------------
# Exact match and perplexity on the shipped held-out sample


def _heldout(n):
    with open(os.path.join(ROOT, "data", "sample_heldout.json"), encoding="utf-8") as f:
        return json.load(f)[:n]


def test_exact_match_on_the_heldout_sample(tmp_path):
    recs = _heldout(40)
    prompts = _write(tmp_path / "heldout.json", recs)
    exact = set(range(0, 40, 4))  # 10 answered exactly
    loose = {1, 6, 11}  # 3 answered up to case, articles and punctuation
    responses = []
    for i, r in enumerate(recs):
        if i in exact:
            responses.append({"response": r["output"]})
        elif i in loose:
            responses.append({"response": "The " + r["output"].upper() + "."})
        else:
            responses.append({"response": "no idea"})
    given = _write(tmp_path / "answers.jsonl", responses, jsonl=True)
    res = evaluate.main(["--models", given, "--prompts", prompts, "--metric", "exact_match", "exact_match_norm",
                         "--output_dir", str(tmp_path / "eval"), "--no_progress"])
    m = res["models"][0]["metrics"]
    assert (m["exact_match"]["correct"], m["exact_match"]["n"], m["exact_match"]["value"]) == (10, 40, 0.25)
    assert m["exact_match_norm"]["correct"] == 13
    hits = [float(i in exact) for i in range(40)]
    assert tuple(m["exact_match"]["ci95"]) == judging.bootstrap_interval(hits, 10000, 42)
    # by hand: resampled hits ~ Binomial(40, 0.25), P(k <= 4) = 0.016 < 2.5% < P(k <= 5) = 0.043, and the
    # 97.5% point lies at k = 15 (P(k <= 15) = 0.9738, close to 0.975, so 16 within sampling error)
    lo, hi = m["exact_match"]["ci95"]
    assert lo == 5 / 40 and hi in (15 / 40, 16 / 40)
    summary = _text(tmp_path / "eval" / "summary.md")
    assert "| answers | 25.0% [" in summary and "32.5% [" in summary


@pytest.mark.slow
def test_cached_generations_scored_and_gold_perplexity(tiny_llama, tmp_path, capsys):
    import torch

    recs = _heldout(12)
    prompts = _write(tmp_path / "heldout.json", recs)
    out = str(tmp_path / "eval")
    args = ["--models", tiny_llama, "--prompts", prompts, "--max_new_tokens", "3", "--output_dir", out,
            "--no_progress", "--metric", "exact_match", "perplexity", "--model_max_length", "256"]
    res = evaluate.main(args)
    gen_file = res["models"][0]["generations"]
    assert res["models"][0]["metrics"]["exact_match"]["correct"] == 0  # a random model
    # the cached generations are what gets scored: make 5 of them right
    rows = _rows(gen_file)
    for i in (0, 3, 4, 7, 11):
        rows[i]["response"] = recs[i]["output"]
    _write(gen_file, rows, jsonl=True)
    capsys.readouterr()
    res = evaluate.main([a for a in args if a != "perplexity"])
    assert res["models"][0]["metrics"]["exact_match"]["correct"] == 5
    assert "loading" not in capsys.readouterr().out  # no model needed: nothing loaded
    # gold perplexity = exp(mean loss over response tokens), against a one-record-at-a-time HF loss
    ppl = res_ppl = evaluate.main(args)["models"][0]["metrics"]["perplexity"]
    model, tok = generation.load_model(tiny_llama, 256, "cpu", torch.float32)
    ids, labels = tokenize_records([dict(r) for r in recs], tok, 256)
    ref, ntok = [], []
    for x, lab in zip(ids, labels):
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([x]), labels=torch.tensor([lab])).loss
        ref.append(float(torch.exp(loss)))
        ntok.append(sum(1 for t in lab[1:] if t != IGNORE_INDEX))
    np.testing.assert_allclose(res_ppl["per_prompt"], ref, rtol=1e-5)
    want = float(np.exp(sum(n * np.log(p) for p, n in zip(ref, ntok)) / sum(ntok)))
    assert ppl["value"] == pytest.approx(want, rel=1e-5) and ppl["per_prompt_tokens"] == ntok


# ----------------------------------------------------------------------------------------
# The OpenAI-compatible judge against a local server


class _Judge(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions with a fixed rule: prefer the answer containing "good" (C if both or
    neither); "BIASED" in the request: always A; "GARBAGE": no verdict. Failures on demand."""

    state: dict = {}

    def log_message(self, *a):
        pass

    def do_POST(self):  # noqa: N802 - the http.server interface
        st = self.state
        st["requests"] += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != "Bearer k-test":
            return self._send(401, {"error": {"message": "bad key"}})
        if st["fail_next"] > 0 or (st["fail_after"] is not None and st["answered"] >= st["fail_after"]):
            st["fail_next"] -= 1
            return self._send(503, {"error": {"message": "overloaded"}})
        user = body["messages"][-1]["content"]
        assert body["messages"][0]["role"] == "system" and body["temperature"] == 0
        a = re.search(r"\[Answer A\]\n(.*)\n\[End of answer A\]", user, re.S).group(1)
        b = re.search(r"\[Answer B\]\n(.*)\n\[End of answer B\]", user, re.S).group(1)
        if "GARBAGE" in user:
            verdict = "Both answers have merits."
        elif "BIASED" in user:
            verdict = "A"
        else:
            verdict = {(True, False): "A", (False, True): "B"}.get(("good" in a, "good" in b), "C")
        st["answered"] += 1
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 1}})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def judge_server():
    _Judge.state = {"requests": 0, "answered": 0, "fail_next": 0, "fail_after": None}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Judge.state
    server.shutdown()
    server.server_close()


def _pairwise_inputs(tmp_path):
    questions = ["Describe the sea.", "Name a colour.", "Count to three.", "BIASED question", "GARBAGE question",
                 "Say hello."]
    a = ["a good answer", "a bad answer", "good", "whatever", "x", "good day"]
    b = ["a bad answer", "good!", "also good", "whatever else", "y", "hi"]
    prompts = _write(tmp_path / "q.jsonl", [{"question_id": i + 1, "text": q} for i, q in enumerate(questions)],
                     jsonl=True)
    return prompts, _write(tmp_path / "a.jsonl", [{"response": r} for r in a], jsonl=True), \
        _write(tmp_path / "b.jsonl", [{"response": r} for r in b], jsonl=True)


def test_openai_judge_retries_caches_and_resumes(judge_server, tmp_path, monkeypatch):
    url, st = judge_server
    monkeypatch.setenv("EVAL_TEST_KEY", "k-test")
    prompts, a, b = _pairwise_inputs(tmp_path)
    out = str(tmp_path / "eval")
    argv = ["--models", a, b, "--prompts", prompts, "--prompt_field", "text", "--output_dir", out,
            "--pairwise", "a", "b", "--judge", "openai:judge-model", "--judge_base_url", url,
            "--judge_api_key_env", "EVAL_TEST_KEY", "--judge_retry_wait", "0.01", "--judge_max_retries", "2",
            "--judge_workers", "1", "--no_progress"]
    # run 1: the first call fails once (retried), then the server goes down after 5 answers
    st["fail_next"], st["fail_after"] = 1, 5
    with pytest.raises(UserError, match="judge unavailable.*5 new verdicts are cached.*rerun"):
        evaluate.main(argv)
    assert st["answered"] == 5 and st["requests"] == 1 + 5 + 3  # 1 failure, 5 answers, 1 try + 2 retries
    # run 2: the server is back; only the 12 - 5 missing verdicts are asked for, with 2 workers
    st.update(requests=0, fail_after=None)
    res = evaluate.main([*argv[:-3], "--judge_workers", "2", "--no_progress"])
    assert st["requests"] == 7
    pair = res["pairwise"][0]
    # by hand: 0 A good -> win; 1 B good -> lose; 2 both good -> C twice -> tie; 3 always "A" -> position
    # bias -> tie; 4 garbage -> failed (not a tie); 5 A good -> win
    assert (pair["win"], pair["tie"], pair["lose"], pair["failed"], pair["total"]) == (2, 2, 1, 1, 5)
    assert pair["winning_score"] == pytest.approx((2 - 1) / 5 + 1)
    assert pair["first_position_preference"] == pytest.approx(5 / 10)
    assert pair["judge_tokens"] == {"prompt": 1200, "completion": 12}
    verdicts = _rows(pair["verdicts_file"])
    assert [v["outcome"] for v in verdicts] == ["win", "lose", "tie", "tie", "failed", "win"]
    assert [v["id"] for v in verdicts] == [1, 2, 3, 4, 5, 6]
    assert verdicts[3]["a_first"]["verdict"] == verdicts[3]["b_first"]["verdict"] == "first"
    assert verdicts[4]["a_first"]["verdict"] is None and verdicts[4]["a_first"]["raw"] == "Both answers have merits."
    summary = _text(os.path.join(out, "summary.md"))
    assert "| a vs b | openai:judge-model | 2 | 2 | 1 | 1 | 1.200 [" in summary
    # run 3: everything cached, no request at all, the same result
    st["requests"] = 0
    res3 = evaluate.main(argv)
    assert st["requests"] == 0 and res3["pairwise"][0]["winning_score"] == pair["winning_score"]
    # the reversed pair reuses the same questions to the judge: no request either
    res4 = evaluate.main([x if x not in ("a", "b") else {"a": "b", "b": "a"}[x] for x in argv])
    assert st["requests"] == 0
    p4 = res4["pairwise"][0]
    assert (p4["win"], p4["lose"], p4["tie"], p4["winning_score"]) == (1, 2, 2, pytest.approx(2 - 1.2))


def test_openai_judge_bad_key_is_one_line_error(judge_server, tmp_path, monkeypatch, capsys):
    url, st = judge_server
    monkeypatch.setenv("EVAL_TEST_KEY", "wrong")
    prompts, a, b = _pairwise_inputs(tmp_path)
    rc = run_cli(evaluate.main, ["--models", a, b, "--prompts", prompts, "--prompt_field", "text", "--output_dir",
                                 str(tmp_path / "e"), "--pairwise", "a", "b", "--judge", "openai:m",
                                 "--judge_base_url", url, "--judge_api_key_env", "EVAL_TEST_KEY", "--no_progress",
                                 "--judge_workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "HTTP 401" in err and len(err.splitlines()) == 1
    assert st["requests"] == 1  # not retried, nothing more asked


# ----------------------------------------------------------------------------------------
# The hf: judge


def _always_a_judge(src, dst):
    """A copy of the tiny Llama that answers "A" whatever it reads: its layers add nothing to the
    residual stream, every embedding has a large constant coordinate 0, and the output rows of
    the letters read that coordinate with A positive, B and C negative."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        head = model.lm_head.weight
        for letter, sign in (("A", 1.0), ("B", -1.0), ("C", -1.0)):
            for variant in (letter, " " + letter):
                t = tok.encode(variant, add_special_tokens=False)[0]
                head[t] = 0.0
                head[t, 0] = sign
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.mark.slow
def test_hf_judge_probabilities_and_position_bias(tiny_llama, tmp_path):
    import torch

    prompts = _write(tmp_path / "p.json", TINY_RECORDS[:5])
    a = _write(tmp_path / "a.jsonl", [{"response": r["output"]} for r in TINY_RECORDS[:5]], jsonl=True)
    b = _write(tmp_path / "b.jsonl", [{"response": "no"} for _ in range(5)], jsonl=True)
    out = str(tmp_path / "eval")
    res = evaluate.main(["--models", a, b, "--prompts", prompts, "--output_dir", out, "--pairwise", "a", "b",
                         "--judge", "hf:" + tiny_llama, "--no_progress"])
    pair = res["pairwise"][0]
    verdicts = _rows(pair["verdicts_file"])
    # every recorded probability is the softmax of one plain forward pass on the rendered judging prompt
    model, tok = generation.load_model(tiny_llama, 512, "cpu", torch.float32)
    first = {k: {tok.encode(v, add_special_tokens=False)[0] for v in (k, " " + k)} for k in "ABC"}
    letter_ids = {k: sorted(first[k] - set().union(*(first[o] for o in "ABC" if o != k))) for k in "ABC"}
    for i, v in enumerate(verdicts):
        for order, (first, second) in (("a_first", (TINY_RECORDS[i]["output"], "no")),
                                       ("b_first", ("no", TINY_RECORDS[i]["output"]))):
            q = TINY_RECORDS[i]["instruction"] + (f"\n\n{TINY_RECORDS[i]['input']}" if TINY_RECORDS[i]["input"] else "")
            user = judging.fill_template(judging.JUDGE_TEMPLATE, question=q, answer_1=first, answer_2=second)
            text = f"{judging.JUDGE_SYSTEM}\n\n{user}\n\nVerdict:"
            with torch.no_grad():
                p = torch.softmax(model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, -1], -1)
            want = {k: float(p[ids].sum()) for k, ids in letter_ids.items()}
            got = v[order]["probs"]
            assert got == pytest.approx(want, rel=1e-5)
            assert v[order]["verdict"] == judging.VERDICT_LETTERS[max(want, key=want.get)]
        assert v["outcome"] == judging.aggregate(v["a_first"]["verdict"], v["b_first"]["verdict"])
    # a judge that always says "A" prefers whichever answer is shown first: every prompt is a tie
    judge = _always_a_judge(tiny_llama, str(tmp_path / "always-a"))
    res = evaluate.main(["--models", a, b, "--prompts", prompts, "--output_dir", out, "--pairwise", "a", "b",
                         "--judge", "hf:" + judge, "--no_progress"])
    pair = res["pairwise"][0]
    assert (pair["win"], pair["tie"], pair["lose"], pair["failed"]) == (0, 5, 0, 0)
    assert pair["winning_score"] == 1.0 and pair["first_position_preference"] == 1.0
    assert tuple(pair["ci95"]) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------
# Bad input: one line, never a silent tie


def test_bad_inputs(tmp_path, tiny_llama, capsys):
    good = _write(tmp_path / "p.json", TINY_RECORDS[:3])
    (tmp_path / "bad.json").write_text("[{")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "many"}')
    model = ["--models", tiny_llama]
    cases = [
        (model + ["--prompts", _write(tmp_path / "noinstr.json", [{"question": "hi"}])], "no 'instruction'"),
        (model + ["--prompts", _write(tmp_path / "nogold.json", [{"instruction": "hi"}]), "--metric", "exact_match"],
         "needs a gold answer"),
        (["--prompts", good, "--models", _write(tmp_path / "short.jsonl", [{"response": "x"}], jsonl=True)],
         "1 responses for 3 prompts"),
        (["--prompts", good, "--models", str(tmp_path / "nope")], "no such folder"),
        (model + ["--prompts", str(tmp_path / "absent.json")], "no such file"),
        (model + ["--prompts", str(tmp_path / "bad.json")], "not valid JSON"),
        (model + ["--prompts", good, "--judge_template", _write(tmp_path / "t.txt", "no placeholders"),
                  "--pairwise", "tiny-llama", "b", "--judge", "openai:m", "--models", tiny_llama,
                  _write(tmp_path / "b.jsonl", [{"response": "x"}] * 3, jsonl=True)], "no placeholder"),
        (["--prompts", good, "--models", str(broken)], "cannot load"),
        (model + ["--prompts", _write(tmp_path / "chat.json", [{"messages": [{"role": "user", "content": 3}]}])],
         "message 0 needs string 'role' and 'content'"),
    ]
    for argv, msg in cases:
        rc = run_cli(evaluate.main, argv + ["--output_dir", str(tmp_path / "e"), "--no_progress",
                                            "--max_new_tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 1, (argv, err)
        assert re.search(msg, err) and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, err)
    # usage errors: exit 2
    for argv in (["--models", "a", "--prompts", good, "--pairwise", "a", "b"],  # no judge
                 ["--models", "a", "b", "--prompts", good, "--pairwise", "a", "c", "--judge", "openai:m"],
                 ["--models", "a", "b", "--prompts", good, "--pairwise", "a", "b", "--judge", "gpt4"],
                 ["--models", "x/a", "y/a", "--prompts", good]):  # same default names
        with pytest.raises(SystemExit) as e:
            evaluate.parse_args(argv)
        assert e.value.code == 2


def test_chat_prompts(tmp_path):
    recs = [{"messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]}]
    prompts = [generation._prompt_entry("f", i, r, None) for i, r in enumerate(recs)]
    assert [p["gold"] for p in prompts] == ["4", None]
    assert [p["question"] for p in prompts] == ["Add 2 and 2.", "System: Be brief.\n\nUser: Capital of Peru?"]
    given = _write(tmp_path / "r.jsonl", [{"response": "4"}, {"response": "Lima"}], jsonl=True)
    path = _write(tmp_path / "chat.jsonl", recs, jsonl=True)
    with pytest.raises(UserError, match="record 1 of .* has none"):
        evaluate.main(["--models", given, "--prompts", path, "--metric", "exact_match", "--output_dir", str(tmp_path)])
    one = _write(tmp_path / "one.jsonl", [{"response": "4"}], jsonl=True)
    res = evaluate.main(["--models", one, "--prompts", _write(tmp_path / "one-p.jsonl", recs[:1], jsonl=True),
                         "--metric", "exact_match", "--output_dir", str(tmp_path)])
    assert res["models"][0]["metrics"]["exact_match"]["correct"] == 1


def test_help_explains_every_flag():
    parser = evaluate.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    for flag in ("--pairwise", "--judge_base_url", "--metric", "--max_new_tokens", "--aggregation"):
        assert flag in text


# ----------------------------------------------------------------------------------------
# One JSON/JSONL reader (data.parse_json_or_jsonl): U+2028 inside strings, malformed files


def test_line_separator_in_prompt_and_cached_response(tiny_llama, tmp_path, capsys):
    # U+2028 (and U+2029, U+0085) are line breaks for str.splitlines() but plain characters in JSON strings
    recs = [{"instruction": "Say hi\u2028twice.", "input": "", "output": "hi\u2029hi"},
            {"instruction": "Name a colour\u0085please.", "input": "", "output": "red"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    prompts = generation.load_prompts(str(path))
    assert [p["record"]["instruction"] for p in prompts] == [r["instruction"] for r in recs]
    out = str(tmp_path / "eval")
    args = ["--models", tiny_llama, "--prompts", str(path), "--max_new_tokens", "2", "--output_dir", out,
            "--no_progress", "--metric", "exact_match"]
    gen_file = evaluate.main(args)["models"][0]["generations"]
    # the cache is written with ensure_ascii=False: a response holding U+2028 must read back, not regenerate
    rows = _rows(gen_file)
    rows[0]["response"] = "hi\u2029hi"
    with open(gen_file, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert "\u2029" in _text(gen_file)
    capsys.readouterr()
    res = evaluate.main(args)
    log = capsys.readouterr().out
    assert f"generations reused: {gen_file}" in log and "loading" not in log
    assert res["models"][0]["metrics"]["exact_match"]["correct"] == 1
    assert _rows(gen_file)[0]["response"] == "hi\u2029hi"


def test_malformed_responses_file_is_one_line_error(tmp_path, capsys):
    prompts = _write(tmp_path / "p.json", TINY_RECORDS[:2])
    (tmp_path / "r.json").write_text('[{"response": "a"}, {"response": ')
    rc = run_cli(evaluate.main, ["--models", str(tmp_path / "r.json"), "--prompts", prompts,
                                 "--output_dir", str(tmp_path / "e"), "--no_progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and "not valid JSON" in err, err


@pytest.mark.slow
def test_response_boundary_reaches_gold_perplexity(tmp_path):
    """A Llama-3-like tokenizer joins ':' with the response's first word: 'paper' and 'exact' score other
    tokens. evaluate.py's --response_boundary must give each one's training tokens (was: always 'auto')."""
    import torch

    from small2large.rendering import RenderOptions, tokenize_records
    from tests._families import make_family

    path = make_family("llama3", str(tmp_path / "m"))
    prompts = _write(tmp_path / "p.json", [dict(r) for r in TINY_RECORDS[:6]])
    model, tok = generation.load_model(path, 128, "cpu", torch.float32)
    got = {}
    for b in ("paper", "exact"):
        res = evaluate.main(["--models", path, "--prompts", prompts, "--metric", "perplexity", "--model_max_length",
                             "128", "--max_new_tokens", "1", "--output_dir", str(tmp_path / b), "--no_progress",
                             "--response_boundary", b])
        got[b] = res["models"][0]["metrics"]["perplexity"]
        ids, labels = tokenize_records([dict(r) for r in TINY_RECORDS[:6]], tok, 128, RenderOptions(b))
        ref = []
        for x, lab in zip(ids, labels):  # one record at a time, HF's own loss
            with torch.no_grad():
                ref.append(float(torch.exp(model(input_ids=torch.tensor([x]), labels=torch.tensor([lab])).loss)))
        np.testing.assert_allclose(got[b]["per_prompt"], ref, rtol=1e-5)
        assert got[b]["per_prompt_tokens"] == [sum(t != IGNORE_INDEX for t in lab[1:]) for lab in labels]
    assert got["paper"]["per_prompt_tokens"] != got["exact"]["per_prompt_tokens"]
