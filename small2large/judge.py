"""The pairwise judge of step 5: the judging prompt, verdict parsing and aggregation, an OpenAI-
compatible judge (with retries) or a local causal LM read through the verdict letters' probabilities,
the verdict cache, and bootstrap confidence intervals."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np

from small2large.generation import load_model, model_identity
from small2large.models import resolve_device_dtype
from utils import UserError

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


OUTCOME_VALUE = {"win": 1, "tie": 0, "lose": -1}


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


def fill_template(template: str, **fields: str) -> str:
    """Substitute {question}, {answer_1}, {answer_2} in one pass: braces in the substituted texts
    (code, JSON) are left alone, and a placeholder inside an answer is not expanded again.

    >>> fill_template("Q: {question} | {answer_1} | {answer_2}", question="{x}", answer_1="{answer_2}", answer_2="b")
    'Q: {x} | {answer_2} | b'
    """
    return re.sub(r"\{(" + "|".join(TEMPLATE_FIELDS) + r")\}", lambda m: fields[m.group(1)], template)


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
