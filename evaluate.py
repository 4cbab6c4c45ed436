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
import json
import os
import re
import sys

from small2large import claims, record_io
from small2large.evaluation import (
    AGGREGATIONS,
    METRICS,
    _name_of,
    evaluate_metrics,
    run_pairwise,
    summary_markdown,
)
from small2large.generation import ModelRunner, generations_for, load_prompts
from small2large.judge import JUDGE_SYSTEM, JUDGE_TEMPLATE, TEMPLATE_FIELDS, VerdictCache, make_judge
from small2large.rendering import BOUNDARIES, CHAT_TEMPLATES, RenderOptions
from utils import HelpFormatter, UserError, atomic_write, file_sha256, run_cli, safe_name

# ----------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=HelpFormatter)
    _add_input_arguments(p)
    _add_rendering_arguments(p)
    _add_generation_arguments(p)
    _add_metric_arguments(p)
    _add_judge_arguments(p)
    return p


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The models, their names, the prompt set and the output folder."""
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
    p.add_argument("--steal_claim", action="store_true",
                   help="take over --output_dir even if another run claims it; if that run is alive it stops at "
                        "its next write, and what it wrote until then stays in the folder")


def _add_rendering_arguments(p: argparse.ArgumentParser) -> None:
    """The "rendering" group: how prompts and gold answers are rendered (as train.py was told)."""
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


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The "generation" group: length, sampling, batching, dtype and device of the generation."""
    g = p.add_argument_group("generation")
    g.add_argument("--attn_implementation", default=None,
                   choices=("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"),
                   help="attention kernel of the evaluated models (as train.py's; torch_varlen has no key/value "
                        "cache, so it cannot generate); default: transformers' choice")
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


def _add_metric_arguments(p: argparse.ArgumentParser) -> None:
    """The "metrics" group: reference metrics, gold perplexity and the bootstrap."""
    m = p.add_argument_group("metrics")
    m.add_argument("--metric", nargs="+", choices=METRICS, default=[], metavar="METRIC",
                   help=f"any of {', '.join(METRICS)}; need gold answers in the prompt file")
    m.add_argument("--model_max_length", type=int, default=512,
                   help="tokens per record when scoring perplexity (use train.py's value; 512 is its default)")
    m.add_argument("--pplx_max_tokens", type=int, default=1536,
                   help="token budget of a perplexity batch (does not change the results; ~1-2k on CPU, ~32k on a GPU)")
    m.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the 95%% intervals")


def _add_judge_arguments(p: argparse.ArgumentParser) -> None:
    """The "pairwise judging" group: the pairs, the judge and its endpoint, and the aggregation rule."""
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
        template = record_io.read_text(args.judge_template)
        absent = [f for f in TEMPLATE_FIELDS if "{" + f + "}" not in template]
        if absent:
            raise UserError(f"--judge_template {args.judge_template}: no placeholder {{{absent[0]}}}")
    with claims.claim_folder(args.output_dir, steal=args.steal_claim) as claim:  # one run per --output_dir
        return run_evaluation(args, prompts, template, claim)


def run_evaluation(args, prompts: list[dict], template: str, claim) -> dict:
    """main() once the run holds --output_dir (``claim``, checked before the summaries are written)."""
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
    claim.check()
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
