"""The paper's command line on today's transformers: its transformers-4 flags translated to their
transformers-5 names, and the CPU fallback (no bf16, no FSDP) when no GPU is present."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from utils import notice

RENAMED_FLAGS = {  # old flag -> current flag (the value, if any, is kept)
    "evaluation_strategy": "eval_strategy",  # removed in transformers 4.46/5.0
    "gradient_checkpointing": "activation_checkpointing",  # deprecated alias in 5.x, removed in 6
}


class LegacyFlagError(ValueError):
    """A legacy flag whose value cannot be translated (reported as a usage error, exit 2)."""


def _split_flag(tok: str) -> tuple[str | None, str | None]:
    """'--a_b=1' -> ('a_b', '1'); '--a-b' -> ('a_b', None); 'x' -> (None, None)."""
    if not tok.startswith("--") or tok == "--":
        return None, None
    name, eq, value = tok[2:].partition("=")
    return name.replace("-", "_"), (value if eq else None)


def _take_value(argv: list[str], i: int, name: str, inline: str | None) -> tuple[str, int]:
    """The value of the flag at argv[i] and the index after it ('--f v' or '--f=v')."""
    if inline is not None:
        return inline, i + 1
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise LegacyFlagError(f"--{name} expects a value")
    return argv[i + 1], i + 2


def translate_legacy_flags(argv: Sequence[str]) -> list[str]:
    """Rewrite the transformers 4.x flags of the paper's commands into their transformers 5 form,
    printing a one-line notice per flag; every other argument is returned unchanged, in order.

        >>> translate_legacy_flags(["--evaluation_strategy", "no", "--warmup_ratio=0.03", "--seed", "42"])
        ['--eval_strategy', 'no', '--warmup_steps', '0.03', '--seed', '42']

    --warmup_ratio R becomes --warmup_steps R: in 5.x a warmup_steps below 1 is a ratio and gives
    ceil(R * total_steps) steps, the 4.x formula. R must be in [0, 1) and cannot be combined with
    --warmup_steps. --fsdp_transformer_layer_cls_to_wrap X (comma-separated names allowed) becomes
    the fsdp_config key transformer_layer_cls_to_wrap, merged into --fsdp_config (inline JSON or a
    JSON file) if one is given; the merged config is passed inline."""
    argv = list(argv)
    out, fsdp_extra, wrap_cls, fsdp_config_pos = _rewrite_flags(argv)
    names: list[str] | None = None
    if wrap_cls is not None:
        names = [s.strip() for s in wrap_cls.split(",") if s.strip()]
        if not names:
            raise LegacyFlagError("--fsdp_transformer_layer_cls_to_wrap expects a class name")
        fsdp_extra["transformer_layer_cls_to_wrap"] = names
    if fsdp_extra:
        _merge_fsdp_config(out, fsdp_extra, wrap_cls, names, fsdp_config_pos)
    return out


def _rewrite_flags(argv: list[str]) -> tuple[list[str], dict, str | None, int | None]:
    """One pass over argv: renamed and warmup flags rewritten, FSDP legacy flags collected; returns
    (out, fsdp_extra, the --fsdp_transformer_layer_cls_to_wrap value, index of the --fsdp_config value)."""
    out: list[str] = []
    fsdp = _fsdp_requested(argv)
    fsdp_extra: dict = {}  # fsdp_config keys made from legacy flags
    warmup_ratio: str | None = None
    has_warmup_steps = False
    wrap_cls: str | None = None
    fsdp_config_pos: int | None = None  # index in `out` of the --fsdp_config value
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, inline = _split_flag(tok)
        if name == "gradient_checkpointing" and fsdp:
            value, i = _optional_value(argv, i, inline)
            if _truthy(value):
                notice("note: --gradient_checkpointing under --fsdp is the fsdp_config key activation_checkpointing "
                       "(FSDP's own; the Trainer's adds a redundant all-gather in the backward)")
                fsdp_extra["activation_checkpointing"] = True
        elif name in RENAMED_FLAGS:
            new = RENAMED_FLAGS[name]
            notice(f"note: --{name} is --{new} in transformers 5; using --{new}")
            out.append(f"--{new}" + (f"={inline}" if inline is not None else ""))
            i += 1
        elif name == "warmup_ratio":
            if warmup_ratio is not None:
                raise LegacyFlagError("--warmup_ratio given twice")
            warmup_ratio, i = _warmup_ratio(argv, i, name, inline)
            out += ["--warmup_steps", warmup_ratio]
        elif name == "fsdp_transformer_layer_cls_to_wrap":
            if wrap_cls is not None:
                raise LegacyFlagError("--fsdp_transformer_layer_cls_to_wrap given twice")
            wrap_cls, i = _take_value(argv, i, name, inline)
        elif name == "fsdp_config":
            if fsdp_config_pos is not None:
                raise LegacyFlagError("--fsdp_config given twice")
            value, i = _take_value(argv, i, name, inline)
            out.append("--fsdp_config")
            fsdp_config_pos = len(out)
            out.append(value)
        else:
            if name == "warmup_steps":
                has_warmup_steps = True
            out.append(tok)
            i += 1
    if warmup_ratio is not None and has_warmup_steps:
        raise LegacyFlagError("give either --warmup_ratio or --warmup_steps, not both "
                              "(in transformers 5 a --warmup_steps below 1 is a ratio)")
    return out, fsdp_extra, wrap_cls, fsdp_config_pos


def _warmup_ratio(argv: list[str], i: int, name: str, inline: str | None) -> tuple[str, int]:
    """The --warmup_ratio value at argv[i], checked to be a number in [0, 1), and the index after it."""
    warmup_ratio, i = _take_value(argv, i, name, inline)
    try:
        r = float(warmup_ratio)
    except ValueError:
        raise LegacyFlagError(f"--warmup_ratio expects a number, got {warmup_ratio!r}") from None
    if not 0.0 <= r < 1.0:
        raise LegacyFlagError(f"--warmup_ratio must be in [0, 1), got {warmup_ratio} "
                              "(use --warmup_steps N for a number of steps)")
    notice(f"note: --warmup_ratio {warmup_ratio} is --warmup_steps {warmup_ratio} in transformers 5 "
            "(a value below 1 is a ratio of the total steps)")
    return warmup_ratio, i


def _merge_fsdp_config(out: list[str], fsdp_extra: dict, wrap_cls: str | None, names: list[str] | None,
                       fsdp_config_pos: int | None) -> None:
    """Merge ``fsdp_extra`` into the --fsdp_config value of ``out`` (in place), or append one."""
    config: dict = {}
    if fsdp_config_pos is not None:
        config = _load_fsdp_config(out[fsdp_config_pos])
    if wrap_cls is not None:
        old = config.pop("fsdp_transformer_layer_cls_to_wrap", None)
        old = config.pop("transformer_layer_cls_to_wrap", old)
        if old is not None and old != names and [old] != names:
            notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} overrides the fsdp_config value {old!r}")
    config.update(fsdp_extra)
    value = json.dumps(config)
    if fsdp_config_pos is None:
        out += ["--fsdp_config", value]
    else:
        out[fsdp_config_pos] = value
    if wrap_cls is not None:
        notice(f"note: --fsdp_transformer_layer_cls_to_wrap {wrap_cls} is the fsdp_config key "
               f"transformer_layer_cls_to_wrap in transformers 5; using --fsdp_config '{value}'")


def _optional_value(argv: list[str], i: int, inline: str | None) -> tuple[str | None, int]:
    """The value of a boolean flag at argv[i] ('--f', '--f v', '--f=v') and the index after it."""
    if inline is not None:
        return inline, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], i + 2
    return None, i + 1


def _truthy(value: str | None) -> bool:
    """A boolean flag's value as HfArgumentParser reads it (a bare flag is True)."""
    from transformers.hf_argparser import string_to_bool

    try:
        return value is None or bool(string_to_bool(value))
    except Exception:  # noqa: BLE001 - argparse reports the bad value later
        return True


def _fsdp_requested(argv: list[str]) -> bool:
    """Whether argv turns FSDP on (--fsdp with a value other than false/empty)."""
    for i, tok in enumerate(argv):
        name, inline = _split_flag(tok)
        if name == "fsdp":
            value, _ = _optional_value(argv, i, inline)
            return value is not None and value.strip().lower() not in ("", "false", "no", "0", "none")
    return False


def _load_fsdp_config(value: str) -> dict:
    if value.lstrip().startswith("{"):
        try:
            config = json.loads(value)
        except json.JSONDecodeError as e:
            raise LegacyFlagError(f"--fsdp_config is not valid JSON ({e})") from None
    else:
        if not os.path.isfile(value):
            raise LegacyFlagError(f"--fsdp_config {value}: no such file")
        with open(value, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise LegacyFlagError(f"--fsdp_config {value}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LegacyFlagError("--fsdp_config must be a JSON object")
    return config


def cpu_fallback(ns: argparse.Namespace) -> None:
    """Without CUDA, adjust the parsed flags in place so a GPU command runs on the CPU, with one
    warning per change: tf32 and fp16 dropped, bf16 kept as CPU autocast, FSDP dropped in favour of
    plain data parallel (its activation checkpointing kept as --activation_checkpointing). Under
    torchrun (WORLD_SIZE > 1) or with bf16, use_cpu is set: transformers 5 accepts bf16 without CUDA
    only with it, and without it a torchrun job is not data parallel (every process trains alone on
    every record and they all write the same --output_dir)."""
    if hasattr(ns, "dataloader_pin_memory"):
        ns.dataloader_pin_memory = False  # pinning has no effect (and warns) without an accelerator
    if getattr(ns, "tf32", None):
        notice("warning: no GPU: --tf32 dropped (TF32 is a CUDA matmul mode)")
        ns.tf32 = None
    for flag in ("fp16", "fp16_full_eval"):
        if getattr(ns, flag, False):
            notice(f"warning: no GPU: --{flag} dropped (float16 mixed precision needs CUDA); computing in float32")
            setattr(ns, flag, False)
    bf16 = getattr(ns, "bf16", False) or getattr(ns, "bf16_full_eval", False)
    if bf16 and not getattr(ns, "use_cpu", False):
        notice("warning: no GPU: --bf16 runs as bfloat16 autocast on the CPU (--use_cpu True)")
        ns.use_cpu = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(ns, "use_cpu", False):
        notice("warning: no GPU: the processes train data parallel on the CPU, DDP over gloo (--use_cpu True)")
        ns.use_cpu = True
    if getattr(ns, "fsdp", None) not in (None, "", False):
        notice(f"warning: no GPU: --fsdp {ns.fsdp!r} dropped, falling back to plain data parallel "
                "(DDP over gloo when launched by torchrun)")
        config = ns.fsdp_config
        if isinstance(config, str):
            try:
                config = _load_fsdp_config(config)
            except LegacyFlagError:
                config = {}
        if isinstance(config, dict) and _truthy(str(config.get("activation_checkpointing", False))):
            notice("note: FSDP's activation checkpointing kept as --activation_checkpointing")
            ns.activation_checkpointing = True
        ns.fsdp = None
        ns.fsdp_config = None
