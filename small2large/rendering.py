"""Records -> token ids and labels: the ONE rendering routine of train.py and dump_pplxs.py.

A record is rendered to a text plus the character spans that are trained on and scored:

* Alpaca records (the paper): the Stanford Alpaca prompt, then ``output + eos``; the span is the
  response + eos. With ``alpaca_as_chat`` they become a one-turn conversation (user: instruction,
  and the input after a blank line; assistant: output) rendered as chat records are.
* Chat records ``{"messages": [{"role", "content"}, ...]}``: with the tokenizer's own chat template
  (``apply_chat_template``, exactly the text the model sees in use) when it has one, else the
  built-in template (``CHAT_SYSTEM_PREFIX`` then ``### {Role}:\n{content}\n\n`` per turn, an eos after
  each assistant content). Scored: each assistant message's content and the end-of-turn marker
  right after it (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama-3, eos in the built-in one); not the
  role header, not what follows the marker. Templates with ``{% generation %}`` give the spans
  through ``return_assistant_tokens_mask``; for the others each assistant turn is located by
  rendering the conversation up to it.

Tokens and labels from a text and its spans (``--response_boundary``):

* ``paper``: tokenize the whole text; the tokens before a span boundary at character c are the
  first len(tokenize(text[:c])) tokens (for Alpaca: the prompt tokenized alone is masked, as the paper
  does). When tokenize(text[:c]) is not a prefix of tokenize(text) -- byte-level BPE tokenizers whose
  pre-tokenizer joins a punctuation mark with the next word (Llama-3, Qwen2: ``":The"``) -- a response
  token is masked or a prompt token scored: such records are counted and reported.
* ``exact``: for those records, the text is tokenized piece by piece (prompt, response, ...) and the
  pieces' tokens concatenated: the boundary is exact, the prompt's tokens are those the model is
  given at generation time (``render_prompt``), and the scored tokens decode to exactly the response.
  Records where the prefix property holds are tokenized as with ``paper`` (the same result). If the
  pieces do not decode to the same text (a SentencePiece tokenizer that adds a prefix space to every
  piece) the paper's tokens are kept and the record is counted as not fixable.
* ``auto`` (default): ``exact`` for byte-level BPE tokenizers whose pre-tokenizer joins punctuation
  with the following letters (the mismatch is systematic there: every Alpaca record whose response
  starts with a letter can be hit), ``paper`` for every other tokenizer (SentencePiece: Llama-2,
  Mistral, Gemma; GPT-2-style byte-level BPE: OPT, GPT-2, Phi), which keeps the paper's numbers.

Truncation is always on the right (at ``model_max_length``), whatever the tokenizer's config says.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from small2large.record_io import alpaca_text, is_chat, load_records
from utils import IGNORE_INDEX, UserError

# Fixed by the paper's repo (Stanford Alpaca's prompt); the perplexities depend on it.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


# The built-in chat template (tokenizers without one): turns rendered as "### {Role}:\n{content}\n\n";
# only the content of assistant turns (plus an eos token after each) is scored / trained on.
CHAT_SYSTEM_PREFIX = "Below is a conversation between a user and an assistant.\n\n"


CHAT_TURN = "### {role}:\n"


BOUNDARIES = ("auto", "paper", "exact")


CHAT_TEMPLATES = ("auto", "tokenizer", "builtin")


@dataclass(frozen=True)
class RenderOptions:
    """How records become tokens (flags of train.py's DataArguments, shared by both scripts)."""

    response_boundary: str = "auto"  # auto | paper | exact
    chat_template: str = "auto"  # auto (the tokenizer's if it has one) | tokenizer | builtin
    alpaca_as_chat: bool = False  # Alpaca records as a one-turn conversation (default: the paper's prompt)

    @classmethod
    def from_args(cls, args) -> RenderOptions:
        """The options of parsed flags (train.py's DataArguments, evaluate.py's namespace)."""
        return cls(args.response_boundary, args.chat_template, args.alpaca_as_chat)

    def __post_init__(self):
        if self.response_boundary not in BOUNDARIES:
            raise ValueError(f"response_boundary must be one of {BOUNDARIES}, got {self.response_boundary!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {self.chat_template!r}")


@dataclass
class BoundaryStats:
    """Records whose prompt tokens are not a prefix of the full text's tokens (``mismatched``),
    how many of them were tokenized exactly (``fixed``), and the mode used."""

    n_records: int = 0
    mismatched: list[int] = field(default_factory=list)
    fixed: int = 0
    mode: str = "paper"

    def message(self) -> str | None:
        n = len(self.mismatched)
        if not n:
            return None
        share = f"{n} of {self.n_records} records (first: record {self.mismatched[0]})"
        if self.mode == "exact":
            rest = f"; {n - self.fixed} could not be split exactly and keep the paper's boundary" if n > self.fixed else ""
            return (f"note: {share}: the prompt's tokens are not a prefix of the prompt + response tokens; "
                    f"{self.fixed} tokenized prompt and response separately (--response_boundary exact){rest}")
        return (f"warning: {share}: the prompt's tokens are not a prefix of the prompt + response tokens, so "
                "the paper's boundary masks a response token or scores a prompt token there; "
                "--response_boundary exact fixes it")


def format_prompt(record: dict) -> str:
    """The Stanford Alpaca prompt for one record (the no-input variant when input is empty)."""
    key = "prompt_input" if record.get("input", "") != "" else "prompt_no_input"
    return PROMPT_DICT[key].format_map(record)


def alpaca_to_messages(record: dict) -> list[dict]:
    r"""An Alpaca record as a one-turn conversation: the user asks the instruction (and the input
    after a blank line), the assistant answers the output.

    >>> alpaca_to_messages({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    [{'role': 'user', 'content': 'Add.\n\n1 and 2'}, {'role': 'assistant', 'content': '3'}]
    """
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return t.get("default") if isinstance(t, dict) else t  # a tokenizer may ship several named templates


def uses_tokenizer_template(tokenizer, options: RenderOptions) -> bool:
    has = bool(_template(tokenizer))
    if options.chat_template == "tokenizer" and not has:
        raise UserError("--chat_template tokenizer: the tokenizer has no chat template "
                        "(use --chat_template builtin or auto)")
    return has and options.chat_template != "builtin"


def joins_punctuation_with_words(tokenizer) -> bool:
    """True for a byte-level BPE tokenizer whose pre-tokenizer keeps a punctuation mark and the
    following letters in one piece (the Llama-3 / Qwen2 regex ``[^\\r\\n\\p{L}\\p{N}]?\\p{L}+``), where
    tokenize(prompt) is often not a prefix of tokenize(prompt + response). False for SentencePiece
    tokenizers (Llama-2, Mistral, Gemma) and GPT-2-style byte-level BPE (OPT, GPT-2, Phi)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return False
    try:
        pieces = [p for p, _ in pre.pre_tokenize_str("a:The b")]
    except Exception:  # noqa: BLE001 - an unusual pre-tokenizer: keep the paper's way
        return False
    byte_level = any("Ġ" in p for p in pieces)  # byte-level BPE maps the space to "Ġ"
    return byte_level and ":The" in pieces


def resolve_boundary(tokenizer, options: RenderOptions) -> str:
    if options.response_boundary != "auto":
        return options.response_boundary
    return "exact" if joins_punctuation_with_words(tokenizer) else "paper"


@contextlib.contextmanager
def right_truncation(tokenizer):
    """Prompt masking counts tokens from the left: truncate on the right whatever the config says."""
    old = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "right"
    try:
        yield
    finally:
        tokenizer.truncation_side = old


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that are scored
    add_special_tokens: bool  # the tokenizer adds bos etc. (Alpaca, built-in); a template writes its own


def render_record(record: dict, tokenizer, options: RenderOptions = RenderOptions()) -> Rendered:
    """The text of one record (prompt + response, or the whole conversation) and its scored spans."""
    if not is_chat(record) and not options.alpaca_as_chat:
        prompt = format_prompt(record)
        text = prompt + f"{record['output']}{tokenizer.eos_token}"
        return Rendered(text, [(len(prompt), len(text))], True)
    messages = record["messages"] if is_chat(record) else alpaca_to_messages(record)
    if uses_tokenizer_template(tokenizer, options):
        return _render_with_template(messages, tokenizer)
    return _render_builtin(messages, tokenizer)


def _render_builtin(messages: list[dict], tokenizer) -> Rendered:
    eos = tokenizer.eos_token
    text, spans = CHAT_SYSTEM_PREFIX, []
    for m in messages:
        text += CHAT_TURN.format(role=m["role"].capitalize())
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            text += "\n\n"
        else:
            text += m["content"] + "\n\n"
    return Rendered(text, spans, True)


def _apply_template(tokenizer, messages, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # jinja errors (e.g. a template that requires alternating roles)
        raise UserError(f"the tokenizer's chat template cannot render this conversation ({type(e).__name__}: {e}); "
                        "use --chat_template builtin") from None


def _special_strings(tokenizer) -> list[str]:
    """Texts of the special tokens, longest first (end-of-turn markers are among them)."""
    out = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok.content))
    return sorted((s for s in out if s), key=len, reverse=True)


def _extend_to_marker(text: str, end: int, limit: int, specials: list[str]) -> int:
    """The end of a scored span: after the special token (end-of-turn marker) that follows the
    content, allowing only whitespace in between, within text[:limit]; else ``end`` unchanged."""
    j = end
    while j < limit and text[j] in " \t":
        j += 1
    for s in specials:
        if text.startswith(s, j) and j + len(s) <= limit:
            return j + len(s)
    return end


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _render_with_template(messages: list[dict], tokenizer) -> Rendered:
    template = _template(tokenizer)
    text = _apply_template(tokenizer, messages)
    specials = _special_strings(tokenizer)
    if _GENERATION_TAG.search(template):
        spans = []
        for a, b in _generation_spans(messages, tokenizer, text):
            if not any(text[a:b].endswith(s) for s in specials):  # the marker was left outside the block
                b = _extend_to_marker(text, b, len(text), specials)
            spans.append((a, b))
        return Rendered(text, spans, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i]) if i else ""
        upto = _apply_template(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(upto)):
            raise UserError("the tokenizer's chat template renders a conversation's beginning differently from the "
                            "whole (it rewrites earlier turns), so the assistant turns cannot be located; "
                            "use a template with {% generation %} or --chat_template builtin")
        content = m["content"].strip()  # templates often trim it (Llama-3's does)
        if not content:
            continue  # an empty answer: nothing to score in this turn
        start = _content_start(text, content, len(before), len(upto), specials)
        if start < 0:
            raise UserError(f"the tokenizer's chat template changes the assistant's content (message {i}); "
                            "use --chat_template builtin")
        end = _extend_to_marker(text, start + len(content), len(upto), specials)
        spans.append((start, end))
    return Rendered(text, spans, False)


def _content_start(text: str, content: str, lo: int, hi: int, specials: list[str]) -> int:
    """Where an assistant turn's content starts in text[lo:hi] (the turn): the last occurrence that
    only whitespace and special tokens (the end-of-turn marker) follow -- so a content such as "a" or
    "end" is not found inside the header or the marker. -1 if the template changed the content."""
    pos = text.rfind(content, lo, hi)
    while pos >= 0:
        rest = text[pos + len(content): hi]
        while True:
            stripped = rest.lstrip()
            for sp in specials:
                if stripped.startswith(sp):
                    stripped = stripped[len(sp):]
                    break
            if stripped == rest:
                break
            rest = stripped
        if not rest:
            return pos
        pos = text.rfind(content, lo, pos + len(content) - 1)
    return -1


def _generation_spans(messages, tokenizer, text) -> list[tuple[int, int]]:
    """Character spans of the template's {% generation %} blocks, from transformers' assistant mask."""
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = enc["assistant_masks"]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans: list[tuple[int, int]] = []
    for m, (a, b) in zip(mask, offsets):
        if not m or b <= a:
            continue
        if spans and spans[-1][1] >= a:  # contiguous tokens: one span
            spans[-1] = (spans[-1][0], max(b, spans[-1][1]))
        else:
            spans.append((a, b))
    return spans


def render_prompt(record: dict, tokenizer, options: RenderOptions = RenderOptions()):
    """The prompt of ``record`` for generation, rendered exactly as training renders it: the text
    and the token ids the model is given (for a chat record: every turn before its final assistant
    turn, or every turn when it ends with a user turn, then the template's generation prompt).
    Returns (text, input_ids)."""
    if not is_chat(record) and not options.alpaca_as_chat:
        text = format_prompt(record)
        return text, tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = record["messages"] if is_chat(record) else alpaca_to_messages(record)
    # an answered conversation is cut before its final answer; an open one (ending in a user turn) is whole
    head = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if uses_tokenizer_template(tokenizer, options):
        text = _apply_template(tokenizer, head, add_generation_prompt=True)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    text = _render_builtin(head, tokenizer).text + CHAT_TURN.format(role="Assistant")
    return text, tokenizer(text, add_special_tokens=True)["input_ids"]


def _encode(tokenizer, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
    if not texts:
        return []
    kw = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return tokenizer(texts, add_special_tokens=add_special_tokens, **kw)["input_ids"]


def _labels_from_prefixes(ids: list[int], cuts: dict[int, list[int]], spans) -> tuple[list[int], bool]:
    """Labels: the tokens in [len(tok(text[:a])), len(tok(text[:b]))) of each span are scored. Also
    whether every prefix's tokens are a prefix of the text's tokens (the paper's assumption)."""
    lab = [IGNORE_INDEX] * len(ids)
    ok = all(ids[: len(pre)] == pre for pre in cuts.values())
    for a, b in spans:
        i, j = len(cuts[a]), len(cuts[b]) if b in cuts else len(ids)
        lab[i:j] = ids[i:j]
    return lab, ok


def _encode_pieces(tokenizer, r: Rendered, max_length: int) -> tuple[list[int], list[int]] | None:
    """The text tokenized piece by piece at the span boundaries; None if the pieces' tokens do not
    decode to the text's (a tokenizer that adds a prefix space to every piece)."""
    cuts = sorted({0, len(r.text), *(c for s in r.spans for c in s)})
    ids: list[int] = []
    lab: list[int] = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        piece = tokenizer(r.text[a:b], add_special_tokens=r.add_special_tokens and k == 0)["input_ids"]
        ids += piece
        inside = any(s <= a and b <= e for s, e in r.spans)
        lab += list(piece) if inside else [IGNORE_INDEX] * len(piece)
    whole = tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]
    if tokenizer.decode(ids) != tokenizer.decode(whole):
        return None
    return ids[:max_length], lab[:max_length]


def tokenize_records(records: Sequence[dict], tokenizer, model_max_length: int,
                     options: RenderOptions = RenderOptions(), stats: BoundaryStats | None = None,
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize records into (input_ids, labels) lists, in dataset order.

    Alpaca records (the paper): text = prompt + output + eos, truncated on the right at
    ``model_max_length``; the first len(tokenize(prompt)) tokens are masked with IGNORE_INDEX (the
    prompt tokenized alone, as the paper does). If the prompt fills the window, every label is
    masked ("fully truncated"). Chat records: only the assistant turns (+ end-of-turn marker) are
    scored. See the module docstring for ``options``. Records where the prompt's tokens are not a
    prefix of the text's are counted in ``stats``; without ``stats`` a warning gives the count."""
    mode = resolve_boundary(tokenizer, options)
    own = stats is None
    stats = stats if stats is not None else BoundaryStats()
    stats.mode, stats.n_records = mode, len(records)
    with right_truncation(tokenizer):
        rendered = [render_record(r, tokenizer, options) for r in records]
        input_ids: list[list[int]] = [[] for _ in records]
        labels: list[list[int]] = [[] for _ in records]
        for special in (True, False):  # one batched call per kind of text (the tokenizer is fast in batches)
            idx = [i for i, r in enumerate(rendered) if r.add_special_tokens == special]
            full = _encode(tokenizer, [rendered[i].text for i in idx], special, model_max_length)
            prefixes = [(i, c) for i in idx for c in sorted({c for s in rendered[i].spans for c in s})
                        if c < len(rendered[i].text)]
            pre_ids = _encode(tokenizer, [rendered[i].text[:c] for i, c in prefixes], special, model_max_length)
            cuts: dict[int, dict[int, list[int]]] = {i: {} for i in idx}
            for (i, c), p in zip(prefixes, pre_ids):
                cuts[i][c] = p
            for i, ids in zip(idx, full):
                lab, ok = _labels_from_prefixes(ids, cuts[i], rendered[i].spans)
                if not ok:
                    stats.mismatched.append(i)
                    if mode == "exact":
                        exact = _encode_pieces(tokenizer, rendered[i], model_max_length)
                        if exact is not None:
                            ids, lab = exact
                            stats.fixed += 1
                input_ids[i], labels[i] = list(ids), lab
    stats.mismatched.sort()
    if own and stats.message():
        warnings.warn(stats.message(), stacklevel=2)
    return input_ids, labels


@dataclass
class SupervisedData:
    """Tokenized records, dataset order. ``n_fully_truncated`` counts records with no label."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_boundary_mismatch: int = 0  # records whose prompt tokens are not a prefix of the full text's
    n_boundary_fixed: int = 0  # of those, tokenized prompt and response separately (--response_boundary exact)
    boundary_message: str | None = None  # the warning to show (None: nothing to report)

    @functools.cached_property
    def n_fully_truncated(self) -> int:  # asked once per dump: counted once
        return sum(1 for lab in self.labels if all(t == IGNORE_INDEX for t in lab))

    def __len__(self) -> int:
        return len(self.input_ids)


def make_supervised_data(data_path: str, tokenizer, model_max_length: int, options=None, fields=None) -> SupervisedData:
    """Load the records (``fields``: a data.Fields column map) and tokenize them
    (rendering.tokenize_records; ``options``: a rendering.RenderOptions, default the paper's rendering)."""

    records = load_records(data_path, allow_chat=True, fields=fields)
    stats = BoundaryStats()
    ids, labels = tokenize_records(records, tokenizer, model_max_length, options or RenderOptions(), stats=stats)
    return SupervisedData(ids, labels, len(stats.mismatched), stats.fixed, stats.message())


def response_text(record: dict) -> str:
    """The response of a record as text, the one definition every step uses (data.alpaca_text's output,
    also the CSV's len_response): Alpaca "output"; chat: the assistant turns joined by newlines.

    >>> response_text({"instruction": "Add.", "input": "", "output": "5"})
    '5'
    >>> response_text({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"},
    ...                             {"role": "user", "content": "?"}, {"role": "assistant", "content": "lo"}]})
    'Hel\\nlo'
    """
    return alpaca_text(record)["output"]


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds a bos to a text (Llama, OPT), else [] (GPT-2, Qwen2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def tokenize_responses(records, tokenizer, model_max_length: int, options=None) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, labels) of every record's response scored WITHOUT its prompt, for IFD's denominator.

    Alpaca records (the paper's prompt): text = output + eos, tokenized with the tokenizer's special
    tokens (a bos where it adds one, e.g. Llama; none for GPT-2), as Cherry / Superfiltering do.
    Records rendered as a conversation (chat records; Alpaca ones with ``alpaca_as_chat``): exactly
    the tokens the prompted pass scores (rendering.tokenize_records with ``options``, a
    rendering.RenderOptions: each assistant turn's content and its end-of-turn marker, e.g.
    ``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama-3), concatenated, after the bos when the
    tokenizer adds one. Truncated at ``model_max_length``. Every token is a label: the scoring shifts
    by one, so the first token is never scored. Without a bos the first response token has no context
    and is left out; with a bos it is scored given the bos. So IFD = PPL(response | prompt) /
    PPL(response alone) compares the same tokens up to that first one. A response truncated in the
    prompted pass (long prompt) is scored on fewer tokens there: see the truncated flag.
    """

    options = options or RenderOptions()
    as_chat = [i for i, r in enumerate(records) if is_chat(r) or options.alpaca_as_chat]
    plain = [i for i in range(len(records)) if not (is_chat(records[i]) or options.alpaca_as_chat)]
    ids: list[list[int]] = [[] for _ in records]
    if plain:
        eos = tokenizer.eos_token or ""
        enc = tokenizer([records[i]["output"] + eos for i in plain], truncation=True, max_length=model_max_length,
                        add_special_tokens=True)["input_ids"]
        for i, x in zip(plain, enc):
            ids[i] = list(x)
    if as_chat:
        # the prompted pass's rendering, untruncated (its boundary notes were shown by that pass)
        _, labels = tokenize_records([records[i] for i in as_chat], tokenizer, None, options, stats=BoundaryStats())
        bos = _bos_prefix(tokenizer)
        for i, lab in zip(as_chat, labels):
            ids[i] = (bos + [t for t in lab if t != IGNORE_INDEX])[:model_max_length]
    return ids, [list(x) for x in ids]
