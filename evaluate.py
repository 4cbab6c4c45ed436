r"""Step 5: did the subset help? Generate with every fine-tuned model, then compare them pairwise with
an LLM judge (the paper's protocol), by exact match where answers are checkable, and by held-out
perplexity of the gold responses.

    # responses of two models to a prompt set (cached), exact match and held-out perplexity
    python evaluate.py --models runs/target-lp1 runs/target-full --prompts data/sample_heldout.json \
        --metric exact_match exact_match_norm perplexity --max_new_tokens 64 --output_dir eval/
    # the paper's protocol: pairwise, both orders, a GPT-4-class judge (any OpenAI-compatible endpoint)
    OPENAI_API_KEY=... python evaluate.py --models output/10_low_lp1 output/full --names lp1 full \
        --prompts test_sets/vicuna.jsonl --prompt_field text --pairwise lp1 full --judge openai:gpt-4o \
        --output_dir eval/vicuna
    # the same with a local judge (the probabilities of the verdict letters, no text parsing)
    python evaluate.py ... --pairwise lp1 full --judge hf:Qwen/Qwen2.5-7B-Instruct
    # a local vLLM server is an OpenAI-compatible endpoint too
    python evaluate.py ... --judge openai:Qwen/Qwen2.5-72B-Instruct --judge_base_url http://127.0.0.1:8000/v1

Prompts: a JSON list or JSONL (.gz read too) of Alpaca records (instruction, optional input, optional
output = the gold answer), chat records {"messages": [...]} (a final assistant turn is the gold answer,
the rest is the prompt), or records whose prompt is in another field (--prompt_field, e.g. Vicuna's
"text", Koala's "prompt"); read by data.parse_json_or_jsonl, as train.py reads JSON. Each prompt is
rendered exactly as train.py trained the model (prompt_ids; give --chat_template, --alpaca_as_chat and
--response_boundary as train.py was given them). A model folder written by train.py --lora_r (the
adapter alone) is loaded as its base model plus the adapter (train.load_adapted).

Generation: greedy by default (--temperature 0), length-sorted batches (--batch_size), left padding,
stopped at eos or --max_new_tokens. Every model's responses are cached in
OUTPUT_DIR/generations/NAME-KEY.jsonl, KEY covering the model folder's content, the prompt file, the
prompts as rendered (token ids) and the generation settings: adding a model, a metric or a judge
re-generates nothing. A "model" may also be a JSONL of responses made elsewhere (one {"response": ...}
per prompt, in prompt order), e.g. generated with vLLM on a cluster.

Pairwise judging (--pairwise A B --judge J): the judge sees every prompt twice, A's answer first and
then B's answer first. Per prompt (--aggregation strict, the default): A wins if both orders prefer A,
loses if both prefer B, and it is a tie otherwise (the judge says tie twice, or disagrees with itself
across orders: position bias cancels out). --aggregation lenient also counts a preference in one order
with a tie in the other as a win/loss. A prompt where the judge failed (no parsable verdict, in either
order) counts as "failed", never as a tie, and is left out of the total. Winning score (the paper's):
(#win - #lose) / #total + 1, in [0, 2], 1 = as good as each other; its 95% interval is a percentile
bootstrap over prompts (--bootstrap resamples, seeded with --seed).

Judges: openai:MODEL (POST {--judge_base_url}/chat/completions, the key from the environment variable
--judge_api_key_env, retries with exponential backoff on 429/5xx/network errors), or hf:PATH (a local
causal LM: the verdict is the most probable of the letters A, B, C as its next token). Every verdict is
cached (OUTPUT_DIR/judge_cache/JUDGE.jsonl, one line appended per verdict), so an interrupted run
resumes without asking (or paying) twice. The judging prompt is JUDGE_TEMPLATE below; --judge_template
FILE replaces it (placeholders {question}, {answer_1}, {answer_2}).

Metrics (--metric): exact_match (response == gold after stripping surrounding white space),
exact_match_norm (lower case, punctuation, articles and extra white space removed), with a bootstrap 95%
interval; perplexity: the perplexity of the gold responses, scored exactly as dump_pplxs.py scores
training records (same tokenization and --response_boundary, dump_pplxs.score_pplxs) with the textbook mean (denominator "mean"),
as one token-level figure for the set: exp(sum_i n_i ln P_i / sum_i n_i), n_i the scored tokens.

Outputs in --output_dir: generations/NAME-KEY.jsonl (per model: prompt, response, gold), verdicts/
A-vs-B-JUDGE.jsonl (per prompt: both orders' verdicts and the outcome), judge_cache/, summary.md (the
tables) and summary.json (every figure).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

import data
from rendering import BOUNDARIES, CHAT_TEMPLATES, RenderOptions
from utils import (
    IGNORE_INDEX,
    HelpFormatter,
    UserError,
    atomic_write,
    run_cli,
    safe_name,
)

METRICS = ("exact_match", "exact_match_norm", "perplexity")
AGGREGATIONS = ("strict", "lenient")
VERDICT_LETTERS = {"A": "first", "B": "second", "C": "tie"}  # what the judge answers -> what it means

JUDGE_SYSTEM = "You are a careful, impartial judge of the answers that AI assistants give to users."
# The default judging prompt. Pairwise, with the two answers shown in a fixed order (evaluate.py asks
# twice, in both orders) and a one-letter verdict so that a local judge can be read from its
# next-token probabilities and an API judge needs a handful of output tokens.
JUDGE_TEMPLATE = """\
Two AI assistants answered the same request from a user. Decide which answer serves the user better.
Consider whether each answer does what was asked, is correct, relevant and complete, and is clearly
written. Do not let the order in which the answers are shown, their length or their style sway you.

[Request]
{question}

[Answer A]
{answer_1}
[End of answer A]

[Answer B]
{answer_2}
[End of answer B]

Reply with one letter and nothing else: A if answer A is better, B if answer B is better, C if they are
equally good."""
TEMPLATE_FIELDS = ("question", "answer_1", "answer_2")


# ----------------------------------------------------------------------------------------
# Pure pieces (tested without any model)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse white space (the usual
    normalisation of reading-comprehension exact match).

    >>> normalize_answer("  The capital of Spain is   Madrid. ")
    'capital of spain is madrid'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(response: str, gold: str, normalize: bool = False) -> bool:
    """response == gold after stripping surrounding white space (or after normalize_answer).

    >>> exact_match(" odd\\n", "odd"), exact_match("Odd.", "odd"), exact_match("Odd.", "odd", normalize=True)
    (True, False, True)
    """
    if normalize:
        return normalize_answer(response) == normalize_answer(gold)
    return response.strip() == gold.strip()


def parse_verdict(text: str) -> str | None:
    """The judge's answer -> "first", "second", "tie", or None (not a verdict: a judge failure).
    Accepts the bare letter, possibly wrapped in brackets, quotes, asterisks or a final period, or a
    single "[[X]]" anywhere; anything else is a failure, never a tie.

    >>> [parse_verdict(t) for t in ["A", " [[B]]\\n", "**C**.", "Verdict: [[A]]", "A or B", "", "D"]]
    ['first', 'second', 'tie', 'first', None, None, None]
    """
    if not isinstance(text, str):
        return None
    bare = text.strip().strip("[]()*\"'`.: \n\t")
    if bare in VERDICT_LETTERS:
        return VERDICT_LETTERS[bare]
    found = set(re.findall(r"\[\[([ABC])\]\]", text))
    if len(found) == 1:
        return VERDICT_LETTERS[found.pop()]
    return None


def aggregate(verdict_ab: str | None, verdict_ba: str | None, rule: str = "strict") -> str:
    """Outcome for model A on one prompt from the judge's verdicts with A's answer shown first
    (``verdict_ab``) and B's answer shown first (``verdict_ba``), each "first"/"second"/"tie"/None.

    strict: "win" if both orders prefer A, "lose" if both prefer B, "tie" otherwise (both say tie, or
    the judge prefers whichever answer comes first or second: position bias). lenient: a preference in
    one order and a tie in the other also decides. "failed" if either verdict is missing.

    >>> aggregate("first", "second"), aggregate("second", "first"), aggregate("first", "first")
    ('win', 'lose', 'tie')
    >>> aggregate("first", "tie"), aggregate("first", "tie", "lenient"), aggregate("tie", None)
    ('tie', 'win', 'failed')
    """
    if verdict_ab is None or verdict_ba is None:
        return "failed"
    pref_ab = {"first": "A", "second": "B", "tie": "tie"}[verdict_ab]
    pref_ba = {"first": "B", "second": "A", "tie": "tie"}[verdict_ba]
    prefs = {pref_ab, pref_ba}
    if prefs == {"A"}:
        return "win"
    if prefs == {"B"}:
        return "lose"
    if rule == "lenient" and prefs in ({"A", "tie"}, {"B", "tie"}):
        return "win" if "A" in prefs else "lose"
    return "tie"


OUTCOME_VALUE = {"win": 1, "tie": 0, "lose": -1}


def winning_score(outcomes: Sequence[str]) -> float:
    """The paper's winning score (#win - #lose) / #total + 1 over the prompts with a verdict
    ("failed" ones are left out of the total).

    >>> winning_score(["win", "win", "tie", "lose", "failed"])   # (2 - 1) / 4 + 1
    1.25
    """
    vals = [OUTCOME_VALUE[o] for o in outcomes if o != "failed"]
    if not vals:
        return float("nan")
    return sum(vals) / len(vals) + 1.0


def bootstrap_interval(values: Sequence[float], n_resamples: int = 10000, seed: int = 42,
                       confidence: float = 0.95, chunk: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``n_resamples`` resamples of the
    same size, with replacement (numpy default_rng(seed).integers, drawn in chunks of ``chunk``
    resamples: the chunking does not change the draws), then the (1-confidence)/2 and
    (1+confidence)/2 percentiles (numpy's linear interpolation).

    >>> bootstrap_interval([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        means[start:start + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def corpus_perplexity(pplxs: Sequence[float], n_tokens: Sequence[int]) -> float:
    """Token-level perplexity of a set from per-record perplexities (each the exp of the mean
    loss over its ``n`` scored tokens): exp(sum n_i ln P_i / sum n_i). Records with no scored
    token are left out.

    >>> round(corpus_perplexity([2.0, 8.0], [1, 2]), 6)   # exp((ln 2 + 2 ln 8) / 3) = 2^(7/3)
    5.039684
    """
    num = sum(n * math.log(p) for p, n in zip(pplxs, n_tokens) if n > 0)
    den = sum(n for n in n_tokens if n > 0)
    if den == 0:
        raise ValueError("no scored token in the set")
    return math.exp(num / den)


def fill_template(template: str, **fields: str) -> str:
    """Substitute {question}, {answer_1}, {answer_2} in one pass: braces in the substituted texts
    (code, JSON) are left alone, and a placeholder inside an answer is not expanded again.

    >>> fill_template("Q: {question} | {answer_1} | {answer_2}", question="{x}", answer_1="{answer_2}", answer_2="b")
    'Q: {x} | {answer_2} | b'
    """
    return re.sub(r"\{(" + "|".join(TEMPLATE_FIELDS) + r")\}", lambda m: fields[m.group(1)], template)


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table with right-aligned columns after the first.

    >>> print(markdown_table(["a", "b"], [["x", "1"]]))
    | a | b |
    |:--|--:|
    | x | 1 |
    """
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: str, prompt_field: str | None = None) -> list[dict]:
    """Read a prompt set (JSON list or JSONL, optionally .gz; data.parse_json_or_jsonl). Returns one dict per prompt, file order:
    {"record": the record rendered for the model (Alpaca or chat), "gold": gold answer or None,
    "question": the request as shown to a judge, "id": the record's id/question_id if any}."""
    _, raw, _ = data.parse_json_or_jsonl(data.read_text(path), path, what="the prompt file",
                                         record_keys=("instruction", "messages", prompt_field or "instruction"))
    if not raw:
        raise UserError(f"{path}: expected a non-empty JSON list of records or JSONL")
    return [_prompt_entry(path, i, r, prompt_field) for i, r in enumerate(raw)]


def _prompt_entry(path: str, i: int, r, prompt_field: str | None) -> dict:
    where = f"{path}: record {i}"
    if not isinstance(r, dict):
        raise UserError(f"{where} is a {type(r).__name__}, expected an object")
    rid = r.get("id", r.get("question_id"))
    if prompt_field is not None:
        if not isinstance(r.get(prompt_field), str) or not r[prompt_field].strip():
            raise UserError(f"{where} has no non-empty string field '{prompt_field}' (--prompt_field)")
        gold = r.get("output") if isinstance(r.get("output"), str) else None
        rec = {"instruction": r[prompt_field], "input": "", **({"output": gold} if gold is not None else {})}
        return {"record": rec, "gold": gold, "question": r[prompt_field], "id": rid}
    if "messages" in r:
        msgs = r["messages"]
        # the loader's checks of a chat record (data.make_view); an open prompt (no assistant turn yet) is checked as if answered
        open_prompt = isinstance(msgs, list) and msgs and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                                 for m in msgs)
        data.make_view(path, i, {"messages": msgs + [{"role": "assistant", "content": ""}]} if open_prompt else r,
                       True, data.Fields().resolved())
        has_gold = msgs[-1]["role"] == "assistant"
        context = msgs[:-1] if has_gold else msgs
        if not context:
            raise UserError(f"{where}: no turn before the assistant's answer")
        question = context[0]["content"] if len(context) == 1 else "\n\n".join(
            f"{m['role'].capitalize()}: {m['content']}" for m in context)
        return {"record": {"messages": msgs}, "gold": msgs[-1]["content"] if has_gold else None,
                "question": question, "id": rid}
    instr = r.get("instruction")
    if not isinstance(instr, str) or not instr.strip():
        keys = ", ".join(list(r)[:6]) or "none"
        raise UserError(f"{where} has no 'instruction' (or 'messages') field; its keys: {keys}. "
                        "Name the prompt's field with --prompt_field")
    inp = r.get("input") or ""
    if not isinstance(inp, str):
        raise UserError(f"{where}: 'input' must be a string, got {type(inp).__name__}")
    gold = r.get("output")
    if gold is not None and not isinstance(gold, str):
        raise UserError(f"{where}: 'output' must be a string, got {type(gold).__name__}")
    rec = {"instruction": instr, "input": inp, **({"output": gold} if gold is not None else {})}
    question = instr + (f"\n\n{inp}" if inp else "")
    return {"record": rec, "gold": gold, "question": question, "id": rid}


def prompt_ids(record: dict, tokenizer, options=None) -> list[int]:
    """THE rendering of a record's prompt for generation: the token ids that training puts before the
    (last) response, so the model continues exactly where it learned to answer (rendering.render_prompt,
    the routine train.py and dump_pplxs.py render with; ``options``: a rendering.RenderOptions, i.e.
    --chat_template / --alpaca_as_chat / --response_boundary as given to train.py). Every other part of evaluate.py goes
    through this function. A chat record without a final assistant turn gets the generation prompt."""
    from rendering import RenderOptions, render_prompt

    return render_prompt(record, tokenizer, options or RenderOptions())[1]


# ----------------------------------------------------------------------------------------
# Models: identity, loading, generation, perplexity

_SAMPLE = 1 << 20  # bytes read at 3 places of a large weight file for its identity
_FULL_HASH_LIMIT = 64 << 20  # files up to this size are hashed whole


def model_identity(path: str) -> str:
    """A hash of a model folder's content: every top-level file's name and size; files up to 64 MiB
    (config, tokenizer, small weights) hashed whole, larger ones by 1 MiB at their start, middle and
    end (retrained weights differ everywhere; this keeps a 70B folder's identity to a second).
    A hub id (no such folder) is identified by its name; a LoRA adapter folder also by its base model."""
    if not os.path.isdir(path):
        return sha256_text("hub", path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            if size <= _FULL_HASH_LIMIT:
                for block in iter(lambda: f.read(_SAMPLE), b""):  # noqa: B023 (f is the loop's own file)
                    h.update(block)
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    f.seek(offset)
                    h.update(f.read(_SAMPLE))
    from train import is_adapter_folder

    if is_adapter_folder(path):  # a LoRA adapter: the base model it applies to is part of the model
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if base and os.path.normpath(base) != os.path.normpath(path):
            h.update(model_identity(base).encode())
    return h.hexdigest()


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + "..."


def _train_error_detail(e: UserError, path: str) -> str:
    """train.py's one-line loading error without its '--model_name_or_path PATH: ' head."""
    return str(e).split(f"{path}: ", 1)[-1]


def load_tokenizer(path: str, model_max_length: int):
    """train.py's tokenizer loading (a SentencePiece-only folder reads as Llama's, as in training)."""
    import train

    try:
        return train.load_tokenizer(path, model_max_length=model_max_length)
    except UserError as e:
        raise UserError(f"--models {path}: cannot load the tokenizer: {_train_error_detail(e, path)}") from None
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's model folder
        raise UserError(f"--models {path}: cannot load the tokenizer ({_one_line(e)})") from None


def load_model(path: str, model_max_length: int, device: str, dtype):
    """train.py's loading (float32, the paper's [PAD] with mean-initialised rows when the tokenizer
    has none; a train.py --lora_r folder: its base model with the adapter, train.load_adapted), then moved to ``device`` and ``dtype``, eval mode. Returns (model, tokenizer)."""
    from train import ModelArguments, is_adapter_folder, load_adapted, load_model_and_tokenizer

    targs = SimpleNamespace(cache_dir=None, model_max_length=model_max_length)
    try:
        if os.path.isdir(path) and is_adapter_folder(path):  # train.py --lora_r: base model + adapter
            model, tokenizer = load_adapted(path, targs)
        else:
            model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=path), targs)
    except UserError as e:
        raise UserError(f"--models {path}: cannot load the model: {_train_error_detail(e, path)}") from None
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build, a corrupt weight file, ...
        raise UserError(f"--models {path}: cannot load the model ({_one_line(e)})") from None
    model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(cfg) if isinstance(cfg, list) else {cfg}
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 42, batch_size: int = 16, progress: bool = True,
             desc: str = "generate") -> list[dict]:
    """Continue every prompt (token ids) with ``model``; returns, in prompt order,
    {"response": decoded text (special tokens dropped, surrounding white space stripped),
    "new_tokens": count, "stopped": True if it ended with eos}. Prompts are batched longest first
    and left-padded; greedy unless ``temperature`` > 0 (then sampling with ``top_p``, seeded)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    eos = _eos_ids(model, tokenizer)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, top_k=None, num_beams=1, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    set_seed(seed)
    out: list[dict | None] = [None] * len(prompts)
    with torch.no_grad():
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                ids[j, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
                att[j, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=config)
            for j, i in enumerate(idx):
                new = gen[j, width:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                toks = new if stop is None else new[:stop]
                out[i] = {"response": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "new_tokens": len(toks), "stopped": stop is not None}
    return out  # type: ignore[return-value]


def gold_perplexities(model, tokenizer, records: Sequence[dict], model_max_length: int,
                      max_tokens: int, options=None) -> tuple[list[float], list[int]]:
    """Perplexity (mean over the response tokens) of every record's gold response, tokenized and
    scored exactly as training scores it (rendering.tokenize_records with the training's ``options``,
    dump_pplxs.score_pplxs), and the number of scored tokens of each."""
    from dump_pplxs import score_pplxs
    from rendering import RenderOptions, tokenize_records
    from utils import SupervisedData

    ids, labels = tokenize_records(records, tokenizer, model_max_length, options or RenderOptions())
    pplxs, _ = score_pplxs(model, SupervisedData(ids, labels), tokenizer.pad_token_id, max_tokens=max_tokens,
                           denominator="mean", progress=False)
    n_tokens = [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels]
    return pplxs, n_tokens


# ----------------------------------------------------------------------------------------
# Judges


class JudgeUnavailable(Exception):
    """The judge could not be reached (after retries): the run stops, the verdicts so far are cached."""


class OpenAIJudge:
    """A model behind an OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, TGI, ...),
    with the standard library's HTTP client. Retries 429, 5xx and network errors with exponential
    backoff (``retry_wait`` * 2^attempt seconds, or the server's Retry-After); other HTTP errors
    (bad key, unknown model) stop the run at once."""

    def __init__(self, model: str, base_url: str, api_key: str | None, max_tokens: int, temperature: float,
                 timeout: float, max_retries: int, retry_wait: float):
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.max_tokens, self.temperature = api_key, max_tokens, temperature
        self.timeout, self.max_retries, self.retry_wait = timeout, max_retries, retry_wait
        self.identity = json.dumps(["openai", model, base_url.rstrip("/"), max_tokens, temperature])

    def ask(self, system: str, user: str) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._wait(attempt, last))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}|{e.headers.get('Retry-After', '')}"
                    continue
                raise UserError(f"judge endpoint {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}|"
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                last = f"not JSON ({e})|"
                continue
            try:
                text = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                return {"raw": None, "error": f"unexpected reply: {json.dumps(payload)[:200]}"}
            return {"raw": text, "usage": payload.get("usage") or {}}
        raise JudgeUnavailable(f"{self.url}: no answer after {self.max_retries + 1} tries "
                               f"(last: {last.split('|')[0]})")

    def _wait(self, attempt: int, last: str) -> float:
        retry_after = last.rsplit("|", 1)[-1]
        with contextlib.suppress(ValueError):
            return min(float(retry_after), 600.0)
        return self.retry_wait * 2 ** (attempt - 1)


class HFJudge:
    """A local causal LM as judge. The judging prompt goes through the tokenizer's chat template if it
    has one (else system, user message and "Verdict:" as plain text); the verdict is the letter among
    A, B, C whose token(s) get the highest next-token probability (each letter with and without a
    leading space; tokens shared by two letters are ignored). No text is generated or parsed."""

    def __init__(self, path: str, device: str, dtype, model_max_length: int = 512):
        self.model, self.tokenizer = load_model(path, model_max_length, device, dtype)
        self.identity = json.dumps(["hf", model_identity(path)])
        cands = {}
        for letter in VERDICT_LETTERS:
            ids = set()
            for variant in (letter, " " + letter):
                toks = self.tokenizer.encode(variant, add_special_tokens=False)
                if toks:
                    ids.add(toks[0])
            cands[letter] = ids
        own = {k: v - set().union(*(cands[o] for o in cands if o != k)) for k, v in cands.items()}
        for letter, ids in own.items():
            if not ids:
                raise UserError(f"--judge hf:{path}: the tokenizer has no token of its own for the verdict '{letter}'")
        self.candidates = {k: sorted(v) for k, v in own.items()}

    def render(self, system: str, user: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        text = (f"{system}\n\n" if system else "") + f"{user}\n\nVerdict:"
        return tok(text, add_special_tokens=True)["input_ids"]

    def letter_probs(self, ids: list[int]) -> dict[str, float]:
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        return {k: float(probs[v].sum()) for k, v in self.candidates.items()}

    def ask(self, system: str, user: str) -> dict:
        probs = self.letter_probs(self.render(system, user))
        return {"raw": max(probs, key=probs.get), "probs": probs}


def make_judge(args):
    kind, _, name = args.judge.partition(":")
    if kind == "openai":
        key = os.environ.get(args.judge_api_key_env) or None
        host = urllib.parse.urlparse(args.judge_base_url).hostname or ""
        if key is None and host.endswith("openai.com"):
            raise UserError(f"--judge {args.judge}: set the API key in the environment variable {args.judge_api_key_env}")
        return OpenAIJudge(name, args.judge_base_url, key, args.judge_max_tokens, args.judge_temperature,
                           args.judge_timeout, args.judge_max_retries, args.judge_retry_wait)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return HFJudge(name, device, dtype, args.model_max_length)


class VerdictCache:
    """Append-only JSONL of judge answers keyed by a hash of (judge, system prompt, user prompt): one
    line written and fsynced per answer, so a run killed at any point keeps every paid answer (a torn
    last line is ignored). An exclusive lock keeps a second process from writing the same cache."""

    def __init__(self, path: str):
        import fcntl

        self.path = path
        self.entries: dict[str, dict] = {}
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
                        e = json.loads(line)
                        self.entries[e["key"]] = e
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed in close()
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise UserError(f"{path}: another evaluate.py is writing this verdict cache") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        entry = {"key": key, **entry}
        with self._lock:
            self._f.write(json.dumps(entry) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self.entries[key] = entry

    def close(self) -> None:
        self._f.close()


def judge_all(judge, cache: VerdictCache, requests: list[tuple[str, str, str]], workers: int = 1,
              progress: bool = True) -> dict[str, dict]:
    """Answers for (key, system, user) requests: cached ones reused, the others asked (``workers``
    at a time) and cached as they arrive. Returns {key: cache entry}."""
    from tqdm.auto import tqdm

    todo = [r for r in dict.fromkeys(requests) if cache.get(r[0]) is None]
    if todo:
        bar = tqdm(total=len(todo), desc="judge", unit="verdict", disable=not progress, dynamic_ncols=True)

        def one(req):
            key, system, user = req
            cache.put(key, judge.ask(system, user))
            bar.update(1)

        try:
            if workers <= 1:
                for req in todo:
                    one(req)
            else:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    futures = [pool.submit(one, r) for r in todo]
                    try:
                        for fut in concurrent.futures.as_completed(futures):
                            fut.result()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
        except JudgeUnavailable as e:
            done = sum(1 for r in todo if cache.get(r[0]) is not None)
            raise UserError(f"judge unavailable: {e}; {done} new verdicts are cached in {cache.path}, "
                            "rerun the same command to resume") from None
        finally:
            bar.close()
    return {r[0]: cache.get(r[0]) for r in requests}


# ----------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="models to evaluate: folders written by train.py (or any save_pretrained folder / hub id), "
                        "or a JSONL of responses made elsewhere (one {\"response\": ...} per prompt, prompt order)")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="a short name per model for tables and file names (default: the folder's or file's base name)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompt set: JSON list or JSONL of Alpaca records (instruction, input, optional output = gold), "
                        "chat records {\"messages\": [...]} (a final assistant turn is the gold), or see --prompt_field")
    p.add_argument("--prompt_field", default=None, metavar="FIELD",
                   help="take each prompt from this field instead (e.g. 'text' for Vicuna's questions, 'prompt' for "
                        "Koala's); it is rendered as an Alpaca instruction without input")
    p.add_argument("--output_dir", default="eval", help="where generations, verdicts and summary.md go")
    r = p.add_argument_group("rendering (give what train.py was given)")
    r.add_argument("--chat_template", choices=CHAT_TEMPLATES, default=RenderOptions.chat_template,
                   help="chat records: the tokenizer's chat template when it has one (auto), required (tokenizer), or "
                        "the built-in '### Role:' template (builtin); as train.py's --chat_template")
    r.add_argument("--response_boundary", choices=BOUNDARIES, default=RenderOptions.response_boundary,
                   help="where the scored gold response starts in the tokens (gold perplexity): as train.py's "
                        "--response_boundary (auto: exact for byte-level BPE tokenizers that join punctuation with the "
                        "next word, e.g. Llama-3, Qwen2; the paper's way otherwise)")
    r.add_argument("--alpaca_as_chat", action="store_true",
                   help="render Alpaca prompts as a one-turn conversation with the chat template (as train.py's "
                        "--alpaca_as_chat True); default: the paper's Alpaca prompt")
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=512,
                   help="longest response in tokens (512 suits open-ended test sets; ~64 for short answers)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (only when --temperature > 0)")
    g.add_argument("--seed", type=int, default=42, help="seed of sampling and of the bootstrap")
    g.add_argument("--batch_size", type=int, default=16,
                   help="prompts per generation batch (length-sorted; ~16-64 on a GPU, results do not depend on it "
                        "beyond floating-point rounding)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype: auto = bfloat16 on a GPU, float32 on the CPU")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    m = p.add_argument_group("metrics")
    m.add_argument("--metric", nargs="+", choices=METRICS, default=[], metavar="METRIC",
                   help=f"any of {', '.join(METRICS)}; need gold answers in the prompt file")
    m.add_argument("--model_max_length", type=int, default=512,
                   help="tokens per record when scoring perplexity (use train.py's value; 512 is its default)")
    m.add_argument("--pplx_max_tokens", type=int, default=1536,
                   help="token budget of a perplexity batch (does not change the results; ~1-2k on CPU, ~32k on a GPU)")
    m.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the 95%% intervals")
    j = p.add_argument_group("pairwise judging")
    j.add_argument("--pairwise", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="compare model A with model B (names or paths from --models); repeat for more pairs")
    j.add_argument("--judge", default=None, metavar="openai:MODEL|hf:PATH",
                   help="openai:MODEL: an OpenAI-compatible endpoint (see --judge_base_url); hf:PATH: a local causal LM")
    j.add_argument("--judge_base_url", default="https://api.openai.com/v1",
                   help="the endpoint's base URL (a vLLM server: http://HOST:8000/v1)")
    j.add_argument("--judge_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never put a key on the command line); "
                        "may be unset for a local server")
    j.add_argument("--judge_template", default=None, metavar="FILE",
                   help="judging prompt (user message) with {question}, {answer_1}, {answer_2}; default: JUDGE_TEMPLATE")
    j.add_argument("--judge_system", default=JUDGE_SYSTEM, help="system message of the judge ('' for none)")
    j.add_argument("--judge_max_tokens", type=int, default=16, help="openai: most tokens of a verdict (one letter)")
    j.add_argument("--judge_temperature", type=float, default=0.0, help="openai: sampling temperature of the judge")
    j.add_argument("--judge_workers", type=int, default=4, help="openai: requests in flight at once")
    j.add_argument("--judge_max_retries", type=int, default=6, help="openai: retries of a failed request")
    j.add_argument("--judge_retry_wait", type=float, default=2.0,
                   help="openai: seconds before the first retry, doubled at each next one")
    j.add_argument("--judge_timeout", type=float, default=120.0, help="openai: seconds to wait for one answer")
    j.add_argument("--aggregation", choices=AGGREGATIONS, default="strict",
                   help="per-prompt rule: strict = a win needs both orders to prefer the model; lenient = a "
                        "preference in one order and a tie in the other also counts")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.models):
        p.error("--names needs one name per --models entry")
    names = args.names or [os.path.splitext(os.path.basename(os.path.normpath(m)))[0] for m in args.models]
    if len(set(names)) != len(names):
        p.error(f"model names are not unique ({', '.join(names)}): give --names")
    args.names = names
    if args.pairwise and not args.judge:
        p.error("--pairwise needs --judge")
    if args.judge and not re.fullmatch(r"(openai|hf):.+", args.judge):
        p.error(f"--judge must be openai:MODEL or hf:PATH, got {args.judge!r}")
    for a, b in args.pairwise:
        for x in (a, b):
            if x not in names and x not in args.models:
                p.error(f"--pairwise {a} {b}: {x} is not one of the models ({', '.join(names)})")
        if _name_of(args, a) == _name_of(args, b):
            p.error(f"--pairwise {a} {b}: a model against itself")
    for flag in ("max_new_tokens", "batch_size", "model_max_length", "pplx_max_tokens", "bootstrap",
                 "judge_max_tokens", "judge_workers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.judge_max_retries < 0 or args.judge_retry_wait < 0:
        p.error("--temperature and --judge_max_retries/--judge_retry_wait must be >= 0, --top_p in (0, 1]")
    return args


def _name_of(args, x: str) -> str:
    return x if x in args.names else args.names[args.models.index(x)]


def _is_responses_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def _read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON list or JSONL file (data.parse_json_or_jsonl; bad JSON is a one-line UserError)."""
    return data.parse_json_or_jsonl(data.read_text(path), path, record_keys=("response", "index"))[1]


def _load_responses(path: str, prompts: list[dict]) -> list[dict]:
    rows = _read_jsonl(path)
    if len(rows) != len(prompts):
        raise UserError(f"{path}: {len(rows)} responses for {len(prompts)} prompts (one per prompt, prompt order)")
    out = []
    for i, (r, pr) in enumerate(zip(rows, prompts)):
        if not isinstance(r, dict) or not isinstance(r.get("response"), str):
            raise UserError(f"{path}: line {i + 1} has no string 'response'")
        if "instruction" in r and r["instruction"] != pr["record"].get("instruction", r["instruction"]):
            raise UserError(f"{path}: line {i + 1} answers another instruction than prompt {i} of the prompt file")
        out.append({"response": r["response"].strip(), "new_tokens": None, "stopped": None})
    return out


def _generation_rows(name: str, prompts: list[dict], gens: list[dict], rendered: list[str] | None) -> list[dict]:
    rows = []
    for i, (pr, g) in enumerate(zip(prompts, gens)):
        row = {"index": i, "id": pr["id"], "model": name, "question": pr["question"]}
        if rendered is not None:
            row["prompt"] = rendered[i]
        rows.append({**row, **g, "gold": pr["gold"]})
    return rows


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _cached_rows(path: str, n: int) -> list[dict] | None:
    try:
        rows = _read_jsonl(path)
    except UserError:
        return None
    if len(rows) != n or [r.get("index") for r in rows] != list(range(n)):
        return None
    return rows


class ModelRunner:
    """Loads each model at most once per run, and only when a generation or a metric needs it."""

    def __init__(self, args):
        self.args = args
        self.loaded: dict[str, tuple] = {}

    def get(self, path: str):
        if path not in self.loaded:
            self.loaded.clear()  # one model in memory at a time
            device, dtype = resolve_device_dtype(self.args.device, self.args.dtype)
            print(f"loading {path} ({dtype}, {device})", flush=True)
            self.loaded[path] = load_model(path, self.args.model_max_length, device, dtype)
        return self.loaded[path]


def render_options(args):
    """The rendering flags (as given to train.py) as a rendering.RenderOptions."""
    return RenderOptions(response_boundary=args.response_boundary, chat_template=args.chat_template,
                         alpaca_as_chat=args.alpaca_as_chat)


def generations_for(args, name: str, path: str, prompts: list[dict], prompt_hash: str, runner: ModelRunner):
    """The rows of OUTPUT_DIR/generations/NAME-KEY.jsonl, generated only if no file with that KEY exists.
    Returns (rows, file, reused)."""
    gen_dir = os.path.join(args.output_dir, "generations")
    if _is_responses_file(path):
        gens = _load_responses(path, prompts)
        out = os.path.join(gen_dir, f"{safe_name(name)}-given.jsonl")
        rows = _generation_rows(name, prompts, gens, None)
        _write_jsonl(out, rows)
        return rows, out, True
    tokenizer = load_tokenizer(path, args.model_max_length)  # fast: the key needs the rendered prompts only
    ids = [prompt_ids(p["record"], tokenizer, render_options(args)) for p in prompts]
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p if args.temperature > 0 else None,
                "seed": args.seed if args.temperature > 0 else None,
                "dtype": str(dtype), "device": device.split(":")[0]}  # bf16 on a GPU and fp32 on a CPU differ
    key = sha256_text(model_identity(path), prompt_hash, sha256_text(json.dumps(ids)),
                      json.dumps(settings, sort_keys=True))[:16]
    out = os.path.join(gen_dir, f"{safe_name(name)}-{key}.jsonl")
    candidates = [out] + ([os.path.join(gen_dir, f) for f in sorted(os.listdir(gen_dir)) if f.endswith(f"-{key}.jsonl")]
                          if os.path.isdir(gen_dir) else [])
    for c in candidates:
        rows = _cached_rows(c, len(prompts))
        if rows is not None:
            print(f"[{name}] generations reused: {c}", flush=True)
            return rows, c, True
    model, tok = runner.get(path)
    ids = [prompt_ids(p["record"], tok, render_options(args)) for p in prompts]  # with train.py's added tokens
    n_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(x) for x in ids)
    if n_pos is not None and longest + args.max_new_tokens > n_pos:
        print(f"warning: [{name}] the longest prompt ({longest} tokens) + --max_new_tokens exceeds the model's "
              f"max_position_embeddings {n_pos}", file=sys.stderr)
    t0 = time.perf_counter()
    gens = generate(model, tok, ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, args.batch_size,
                    progress=not args.no_progress, desc=f"generate {name}")
    dt = time.perf_counter() - t0
    n_tok = sum(g["new_tokens"] for g in gens)
    print(f"[{name}] {len(gens)} responses, {n_tok} tokens in {dt:.1f} s ({n_tok / max(dt, 1e-9):.0f} tokens/s), "
          f"{sum(not g['stopped'] for g in gens)} cut at --max_new_tokens: {out}", flush=True)
    rows = _generation_rows(name, prompts, gens, [tok.decode(x) for x in ids])
    _write_jsonl(out, rows)
    return rows, out, False


def _fmt_ci(value: float, ci: tuple[float, float], digits: int = 3, pct: bool = False) -> str:
    if math.isnan(value):
        return "-"
    if pct:
        return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def evaluate_metrics(args, name, path, prompts, rows, runner) -> dict:
    res: dict = {}
    golds = [p["gold"] for p in prompts]
    for metric in ("exact_match", "exact_match_norm"):
        if metric in args.metric:
            hits = [float(exact_match(r["response"], g, normalize=metric.endswith("norm"))) for r, g in zip(rows, golds)]
            res[metric] = {"value": sum(hits) / len(hits), "correct": int(sum(hits)), "n": len(hits),
                           "ci95": bootstrap_interval(hits, args.bootstrap, args.seed),
                           "per_prompt": [bool(h) for h in hits]}
    if "perplexity" in args.metric:
        if _is_responses_file(path):
            res["perplexity"] = None  # no model to score with
        else:
            model, tok = runner.get(path)
            pplxs, n_tokens = gold_perplexities(model, tok, [p["record"] for p in prompts], args.model_max_length,
                                                args.pplx_max_tokens, render_options(args))
            res["perplexity"] = {"value": corpus_perplexity(pplxs, n_tokens), "median": float(np.median(pplxs)),
                                 "n_fully_truncated": sum(1 for n in n_tokens if n == 0),
                                 "per_prompt": pplxs, "per_prompt_tokens": n_tokens}
    return res


def run_pairwise(args, a: str, b: str, rows_by_name: dict, prompts: list[dict], judge, cache, template: str) -> dict:
    system = args.judge_system
    reqs, plan = [], []
    for i, pr in enumerate(prompts):
        ra, rb = rows_by_name[a][i]["response"], rows_by_name[b][i]["response"]
        keys = []
        for first, second in ((ra, rb), (rb, ra)):
            user = fill_template(template, question=pr["question"], answer_1=first, answer_2=second)
            key = sha256_text(judge.identity, system, user)
            reqs.append((key, system, user))
            keys.append(key)
        plan.append(keys)
    answers = judge_all(judge, cache, reqs, workers=args.judge_workers if isinstance(judge, OpenAIJudge) else 1,
                        progress=not args.no_progress)
    records, outcomes = [], []
    first_pref = n_verdicts = 0
    for i, (k_ab, k_ba) in enumerate(plan):
        v_ab, v_ba = (parse_verdict(answers[k].get("raw")) for k in (k_ab, k_ba))
        outcome = aggregate(v_ab, v_ba, args.aggregation)
        outcomes.append(outcome)
        for v in (v_ab, v_ba):
            if v is not None:
                n_verdicts += 1
                first_pref += v == "first"
        records.append({"index": i, "id": prompts[i]["id"], "question": prompts[i]["question"],
                        "model_a": a, "model_b": b,
                        "a_first": {"verdict": v_ab, **{k: v for k, v in answers[k_ab].items() if k != "key"}},
                        "b_first": {"verdict": v_ba, **{k: v for k, v in answers[k_ba].items() if k != "key"}},
                        "outcome": outcome})
    counts = {o: outcomes.count(o) for o in ("win", "tie", "lose", "failed")}
    vals = [OUTCOME_VALUE[o] for o in outcomes if o != "failed"]
    lo, hi = bootstrap_interval(vals, args.bootstrap, args.seed)
    usage = [answers[k].get("usage") or {} for pair in plan for k in pair]
    res = {"model_a": a, "model_b": b, "judge": args.judge, "aggregation": args.aggregation, **counts,
           "total": len(vals), "winning_score": winning_score(outcomes), "ci95": (lo + 1.0, hi + 1.0),
           "first_position_preference": first_pref / n_verdicts if n_verdicts else float("nan"),
           "judge_tokens": {"prompt": sum(u.get("prompt_tokens", 0) for u in usage),
                            "completion": sum(u.get("completion_tokens", 0) for u in usage)}}
    out = os.path.join(args.output_dir, "verdicts", f"{safe_name(a)}-vs-{safe_name(b)}-{safe_name(args.judge)}.jsonl")
    _write_jsonl(out, records)
    res["verdicts_file"] = out
    if counts["failed"]:
        print(f"warning: {a} vs {b}: the judge failed on {counts['failed']} of {len(prompts)} prompts (no parsable "
              f"verdict in at least one order); they are left out of the total, see {out}", file=sys.stderr)
    return res


def summary_markdown(args, models: list[dict], pairs: list[dict]) -> str:
    out = [f"# Evaluation on {args.prompts}", ""]
    out += [markdown_table(["model", "source", "responses"],
                           [[m["name"], m["path"], m["generations"]] for m in models]), ""]
    if args.metric:
        header = ["model"]
        for k in args.metric:
            header += {"exact_match": ["exact match [95% CI]"], "exact_match_norm": ["normalised EM [95% CI]"],
                       "perplexity": ["gold ppl", "median record ppl"]}[k]
        rows = []
        for m in models:
            cells = []
            for k in args.metric:
                r = m["metrics"].get(k)
                if k == "perplexity":
                    cells += ["-", "-"] if r is None else [f"{r['value']:.3f}", f"{r['median']:.3f}"]
                elif r is None:
                    cells.append("-")
                else:
                    cells.append(_fmt_ci(r["value"], r["ci95"], pct=True))
            rows.append([m["name"]] + cells)
        out += ["## Metrics (exact match: share of prompts; perplexity of the gold responses: lower is better)", "",
                markdown_table(header, rows), ""]
    if pairs:
        rows = [[f"{r['model_a']} vs {r['model_b']}", r["judge"], str(r["win"]), str(r["tie"]), str(r["lose"]),
                 str(r["failed"]), _fmt_ci(r["winning_score"], r["ci95"]),
                 "-" if math.isnan(r["first_position_preference"]) else f"{100 * r['first_position_preference']:.0f}%"]
                for r in pairs]
        out += [f"## Pairwise ({pairs[0]['aggregation']} rule; winning score = (win - lose) / (win + tie + lose) + 1, "
                "> 1: the first model is better)", "",
                markdown_table(["pair", "judge", "win", "tie", "lose", "judge failed", "winning score [95% CI]",
                                "verdicts for the answer shown first"], rows), ""]
    return "\n".join(out)


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    prompts = load_prompts(args.prompts, args.prompt_field)
    for metric in args.metric:
        missing = [i for i, p in enumerate(prompts) if p["gold"] is None]
        if missing:
            raise UserError(f"--metric {metric} needs a gold answer ('output', or a final assistant turn) for every "
                            f"prompt; record {missing[0]} of {args.prompts} has none ({len(missing)} in all)")
    for path in args.models:
        if not (os.path.exists(path) or re.fullmatch(r"[\w.\-]+/[\w.\-]+", path)):
            raise UserError(f"--models {path}: no such folder or file")
    template = JUDGE_TEMPLATE
    if args.judge_template:
        template = data.read_text(args.judge_template)
        absent = [f for f in TEMPLATE_FIELDS if "{" + f + "}" not in template]
        if absent:
            raise UserError(f"--judge_template {args.judge_template}: no placeholder {{{absent[0]}}}")
    os.makedirs(args.output_dir, exist_ok=True)
    from utils import file_sha256

    prompt_hash = file_sha256(args.prompts)
    print(f"{len(prompts)} prompts from {args.prompts}; {len(args.models)} models", flush=True)
    need_gen = bool(args.pairwise) or any(m.startswith("exact") for m in args.metric) or not args.metric
    runner = ModelRunner(args)
    models, rows_by_name = [], {}
    for name, path in zip(args.names, args.models):
        if need_gen:
            rows, gen_file, _ = generations_for(args, name, path, prompts, prompt_hash, runner)
        else:
            rows, gen_file = [{"index": i, "response": None} for i in range(len(prompts))], "-"
        metrics = evaluate_metrics(args, name, path, prompts, rows, runner)
        rows_by_name[name] = rows
        models.append({"name": name, "path": path, "generations": gen_file, "metrics": metrics})
    runner.loaded.clear()
    pairs = []
    if args.pairwise:
        judge = make_judge(args)
        cache = VerdictCache(os.path.join(args.output_dir, "judge_cache", safe_name(args.judge) + ".jsonl"))
        try:
            for a, b in args.pairwise:
                pairs.append(run_pairwise(args, _name_of(args, a), _name_of(args, b), rows_by_name, prompts, judge,
                                          cache, template))
        finally:
            cache.close()
    text = summary_markdown(args, models, pairs)
    print(text)
    with atomic_write(os.path.join(args.output_dir, "summary.md")) as f:
        f.write(text)
    result = {"prompts": args.prompts, "n_prompts": len(prompts), "models": models, "pairwise": pairs,
              "settings": {k: v for k, v in vars(args).items() if k != "judge_system"}}
    with atomic_write(os.path.join(args.output_dir, "summary.json")) as f:
        f.write(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
