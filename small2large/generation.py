"""evaluate.py's inputs and responses: the prompt file, model identity (for the generations cache),
loading a model as train.py does, greedy or sampled generation, and the cached generation files."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace

from small2large import models, record_io
from small2large.models import (
    ModelArguments,
    is_adapter_folder,
    load_adapted,
    load_model_and_tokenizer,
    resolve_device_dtype,
)
from small2large.rendering import RenderOptions, render_prompt
from utils import UserError, atomic_write, safe_name, sha256_text


def load_prompts(path: str, prompt_field: str | None = None) -> list[dict]:
    """Read a prompt set (JSON list or JSONL, optionally .gz; data.parse_json_or_jsonl). Returns one dict per prompt, file order:
    {"record": the record rendered for the model (Alpaca or chat), "gold": gold answer or None,
    "question": the request as shown to a judge, "id": the record's id/question_id if any}."""
    _, raw, _ = record_io.parse_json_or_jsonl(record_io.read_text(path), path, what="the prompt file",
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
        record_io.make_view(path, i, {"messages": msgs + [{"role": "assistant", "content": ""}]} if open_prompt else r,
                       True, record_io.Fields().resolved())
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

    return render_prompt(record, tokenizer, options or RenderOptions())[1]


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

    if is_adapter_folder(path):  # a LoRA adapter: the base model it applies to is part of the model
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        if base and os.path.normpath(base) != os.path.normpath(path):
            h.update(model_identity(base).encode())
    return h.hexdigest()


def load_model(path: str, model_max_length: int, device: str, dtype, attn_implementation: str | None = None):
    """train.py's loading (models.load_model_and_tokenizer: float32, the paper's [PAD] with
    mean-initialised rows when the tokenizer has none; a train.py --lora_r folder: its base model with
    the adapter, models.load_adapted), then moved to ``device`` and ``dtype``, eval mode. Errors are
    headed "--models PATH: cannot load the model". Returns (model, tokenizer)."""
    targs = SimpleNamespace(cache_dir=None, model_max_length=model_max_length, use_cpu=not device.startswith("cuda"))
    if os.path.isdir(path) and is_adapter_folder(path):  # train.py --lora_r: base model + adapter
        model, tokenizer = load_adapted(path, targs, head=f"--models {path}: cannot load the model")
    else:
        margs = ModelArguments(model_name_or_path=path, attn_implementation=attn_implementation)
        model, tokenizer = load_model_and_tokenizer(margs,
                                                    targs,
                                                    head=f"--models {path}: cannot load the model")
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


def _is_responses_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def _read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON list or JSONL file (data.parse_json_or_jsonl; bad JSON is a one-line UserError)."""
    return record_io.parse_json_or_jsonl(record_io.read_text(path), path, record_keys=("response", "index"))[1]


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
            self.loaded[path] = load_model(path, self.args.model_max_length, device, dtype,
                                           getattr(self.args, "attn_implementation", None))
        return self.loaded[path]


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
    options = RenderOptions.from_args(args)
    tokenizer = models.load_tokenizer(path, head=f"--models {path}: cannot load the tokenizer", model_max_length=args.model_max_length)  # fast: the key needs the rendered prompts only
    ids = [prompt_ids(p["record"], tokenizer, options) for p in prompts]
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
    ids = [prompt_ids(p["record"], tok, options) for p in prompts]  # with train.py's added tokens
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
