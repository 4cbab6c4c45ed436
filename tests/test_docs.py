"""The documentation's commands stay true (README.md and docs/*.md; the rules are in docs/testing.md).

Every `python`, `python3`, `torchrun` and `bash` command of a fenced code block (info string empty, bash,
sh, shell or console) is extracted: backslash-continued lines joined, comment lines skipped, `VAR=1`
prefixes and torchrun's own flags set aside, `&&` / `;` / `|` chains split. Each Python script's flags are
then parsed by the script's own parser, without running anything (a `NAME=(...)` bash array of the same
block is expanded where `"${NAME[@]}"` uses it):

* the parser is found by calling the script's parse_args(argv) (its main(argv) if it has none) with
  argparse's parse_known_args intercepted, so whatever the script does to argv first (train.py and
  dump_pplxs.py translate the paper's transformers-4 flags) is applied, and nothing after it runs;
* a plain argparse script's parse_args then runs for real (pure: its cross-flag checks included);
* an HfArgumentParser script (train.py, dump_pplxs.py) gets argparse's parse (unknown flags, missing
  required ones, types, choices) plus its own dataclasses' checks, except the TrainingArguments one
  (transformers' __post_init__ sets global state and would need a GPU for --bf16 / --tf32); the CPU
  fallback is not applied;
* flags are given by their whole names (argparse would take a unique prefix as an abbreviation), and
  train.py / dump_pplxs.py commands name --model_name_or_path (its default is no documented run's model);
* an error that only says a named input file or folder does not exist is not a documentation error.

A literal `...` argument means "other flags elided"; it is allowed only in a command whose last line carries
a `# elided` comment, and such a command is checked for unknown flags only. `bash SCRIPT` needs the script
to exist and every `VAR=...` prefix to be a variable the script reads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SHELL_INFO = {"", "bash", "sh", "shell", "console"}  # fenced blocks read as commands (not ```text, ```python ...)
LAUNCHERS = {"python", "python3", "torchrun", "bash"}
ELIDED = "..."
ELIDED_MARK = re.compile(r"#\s*elided\b")
SHELL_KEYWORDS = {"do", "then", "else", "time", "!"}
CHAIN = {"&&", "||", ";", "|", "&", ";;"}
PIPELINE_SCRIPTS = ("clustering.py", "dump_pplxs.py", "process_pickle.py", "subset.py", "report.py", "train.py",
                    "evaluate.py")
# Flags a documented command must give although the script has a default for them: train.py and
# dump_pplxs.py fall back to facebook/opt-125m, which no documented run means.
MUST_GIVE = {"train.py": ("--model_name_or_path",), "dump_pplxs.py": ("--model_name_or_path",)}
MISSING_INPUT = re.compile(r"no such (file|folder|model folder|checkpoint folder)", re.IGNORECASE)


class Command(NamedTuple):
    where: str  # "README.md:12"
    text: str  # the command as written (continuations joined)
    env: tuple  # VAR names set in front of it
    argv: tuple  # launcher first: ("python3", "train.py", "--flag", ...)
    elided: bool  # its last line carries the # elided mark


# ---------------------------------------------------------------------------------------------
# Extraction


def code_blocks(text: str):
    """(first line number, lines) of every fenced block whose info string is a shell one."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        body, start = [], i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if info.lower() in SHELL_INFO:
            yield start, body


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _segments(tokens: list[str]):
    seg: list[str] = []
    for t in tokens:
        if t in CHAIN:
            yield seg
            seg = []
        else:
            seg.append(t)
    yield seg


def _strip_redirections(seg: list[str]) -> list[str]:
    out, skip = [], False
    for t in seg:
        if skip:
            skip = False
        elif t and set(t) <= set("<>&"):
            skip = True
            if out and out[-1].isdigit():
                out.pop()
        else:
            out.append(t)
    return out


def commands_in(text: str, name: str) -> list[Command]:
    """Every launcher command of the shell blocks of a Markdown text (name: for the file:line labels)."""
    found = []
    for start, body in code_blocks(text):
        arrays: dict[str, list[str]] = {}  # NAME=(...) of this block, expanded where "${NAME[@]}" is used
        j = 0
        while j < len(body):
            first, parts = j, []
            while True:
                line = body[j]
                j += 1
                if line.rstrip().endswith("\\") and j < len(body):
                    parts.append(line.rstrip()[:-1])
                    continue
                parts.append(line)
                break
            logical = " ".join(p.strip() for p in parts)
            if logical.startswith("$ "):
                logical = logical[2:]
            if not logical or logical.startswith("#"):
                continue
            where = f"{name}:{start + first}"
            try:
                array = re.fullmatch(r"([A-Za-z_]\w*)=\((.*)\)\s*(#.*)?", logical)
                if array:
                    arrays[array.group(1)] = _tokens(array.group(2))
                    continue
                tokens = []
                for t in _tokens(logical):
                    use = re.fullmatch(r"\$\{(\w+)\[@\]\}", t)
                    tokens += arrays[use.group(1)] if use and use.group(1) in arrays else [t]
            except ValueError as e:
                found.append(Command(where, logical, (), ("?unparsable", str(e)), False))
                continue
            elided = bool(ELIDED_MARK.search(parts[-1]))
            for seg in _segments(tokens):
                seg = _strip_redirections(seg)
                env = []
                while seg and (seg[0] in SHELL_KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=.*", seg[0])):
                    if "=" in seg[0]:
                        env.append(seg[0].split("=", 1)[0])
                    seg = seg[1:]
                if seg and os.path.basename(seg[0]) in LAUNCHERS:
                    found.append(Command(where, logical, tuple(env), (os.path.basename(seg[0]), *seg[1:]), elided))
    return found


def doc_commands() -> list[Command]:
    out = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            out += commands_in(f.read(), os.path.relpath(path, ROOT))
    return out


# ---------------------------------------------------------------------------------------------
# Checking


class _Captured(Exception):
    def __init__(self, parser, args):
        super().__init__("parser captured")
        self.parser, self.args = parser, args


_ORIG_PARSE_KNOWN = argparse.ArgumentParser.parse_known_args
_MODULES: dict = {}


def _module(script: str):
    """The script imported as a module: top-level scripts under their own name (as the other tests import
    them), examples/ and bench/ ones under a private name."""
    if script not in _MODULES:
        if os.path.dirname(script) == "":
            if ROOT not in sys.path:
                sys.path.insert(0, ROOT)
            _MODULES[script] = importlib.import_module(script[:-3])
        else:
            name = "_docs_" + re.sub(r"\W", "_", script[:-3])
            spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _MODULES[script] = mod
    return _MODULES[script]


@contextlib.contextmanager
def _quiet():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield err


def _exit_message(err: io.StringIO, e: BaseException) -> str:
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    return (errors or lines or [f"{type(e).__name__}: {e}"])[-1].strip()


def _capture(entry, argv: list[str]):
    """(parser, argv as the script hands it to argparse) without parsing anything; a usage error raised
    before parsing (e.g. an untranslatable legacy flag) comes back as a string."""

    def spy(self, args=None, namespace=None):
        raise _Captured(self, None if args is None else list(args))

    argparse.ArgumentParser.parse_known_args = spy
    try:
        with _quiet() as err:
            try:
                entry(argv)
            except _Captured as c:
                return c.parser, c.args
            except SystemExit as e:
                return _exit_message(err, e)
    finally:
        argparse.ArgumentParser.parse_known_args = _ORIG_PARSE_KNOWN
    return "the script's parse_args/main never parsed its arguments"


def _hf_checks(parser, argv: list[str]) -> str | None:
    """argparse's parse of an HfArgumentParser, then each of its dataclasses but TrainingArguments."""
    with _quiet() as err:
        try:
            ns, extra = _ORIG_PARSE_KNOWN(parser, argv)
        except SystemExit as e:
            return _exit_message(err, e)
    if extra:
        return f"unrecognized arguments: {' '.join(extra)}"
    import transformers

    for dtype in parser.dataclass_types:
        if issubclass(dtype, transformers.TrainingArguments):
            continue
        kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(dtype) if f.init and hasattr(ns, f.name)}
        try:
            with _quiet():
                dtype(**kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the script's own checks is reported
            if not MISSING_INPUT.search(str(e)):
                return f"{dtype.__name__}: {e}"
    return None


def check_python(script: str, args: list[str], elided: bool) -> str | None:
    """None if the script's own parser accepts ``args``, else the error (one line)."""
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return f"{script}: no such script"
    if ELIDED in args and not elided:
        return f"'{ELIDED}' stands for elided flags only in a command marked '# elided' (docs/testing.md)"
    mod = _module(script)
    entry = getattr(mod, "parse_args", None) or mod.main
    argv = [a for a in args if a != ELIDED]
    got = _capture(entry, argv)
    if isinstance(got, str):
        return got
    parser, translated = got
    translated = argv if translated is None else translated
    known = parser._option_string_actions
    unknown = [a.split("=", 1)[0] for a in translated
               if a.startswith("-") and not re.fullmatch(r"-\d.*", a) and a.split("=", 1)[0] not in known]
    if unknown:  # argparse would take a unique prefix as an abbreviation: the documents give whole names
        return f"unrecognized arguments: {' '.join(unknown)} (not a flag of {script}, or abbreviated)"
    if elided:
        return None
    base = os.path.basename(script)
    absent = [f for f in MUST_GIVE.get(base, ()) if not any(a == f or a.startswith(f + "=") for a in argv)]
    if absent:
        return f"{', '.join(absent)} not given: the script's default is not what a documented run means"
    if hasattr(parser, "dataclass_types"):
        return _hf_checks(parser, translated)
    with _quiet() as err:
        try:
            if getattr(mod, "parse_args", None) is not None:
                mod.parse_args(argv)
            else:
                argparse.ArgumentParser.parse_args(parser, translated)
        except SystemExit as e:
            if e.code in (0, None):
                return None  # -h
            msg = _exit_message(err, e)
            return None if MISSING_INPUT.search(msg) else msg
        except Exception as e:  # noqa: BLE001
            return None if MISSING_INPUT.search(str(e)) else f"{type(e).__name__}: {e}"
    return None


def _script_reads(path: str, var: str) -> bool:
    with open(path, encoding="utf-8") as f:
        code = "\n".join(ln for ln in f if not ln.lstrip().startswith("#"))
    return re.search(r"\$\{?" + re.escape(var) + r"\b", code) is not None


def check_command(cmd: Command) -> str | None:
    launcher, *rest = cmd.argv
    if launcher == "?unparsable":
        return f"cannot split the command: {rest[0]}"
    if launcher == "bash":
        if not rest:
            return None
        path = os.path.join(ROOT, rest[0])
        if not os.path.isfile(path):
            return f"{rest[0]}: no such script"
        unread = [v for v in cmd.env if not _script_reads(path, v)]
        return f"{rest[0]} does not read {', '.join(unread)}" if unread else None
    if launcher == "torchrun":
        scripts = [i for i, a in enumerate(rest) if a.endswith(".py")]
        if not scripts:
            return "torchrun without a script"
        return check_python(rest[scripts[0]], rest[scripts[0] + 1:], cmd.elided)
    if not rest or rest[0] == "-c":
        return None
    if rest[0] == "-m":
        if len(rest) > 1 and rest[1] == "pip" and "-r" in rest:
            req = rest[rest.index("-r") + 1]
            return None if os.path.isfile(os.path.join(ROOT, req)) else f"{req}: no such file"
        if len(rest) > 1 and rest[1] == "pytest":
            paths = [a.split("::")[0] for a in rest[2:] if not a.startswith("-") and ("/" in a or a.endswith(".py"))]
            missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
            return f"no such test path: {', '.join(missing)}" if missing else None
        return None
    if rest[0].startswith("-"):
        return None
    return check_python(rest[0], rest[1:], cmd.elided)


COMMANDS = doc_commands()


def _label(c: Command) -> str:
    scripts = [a for a in c.argv if a.endswith((".py", ".sh"))]
    return f"{c.where}:{scripts[0] if scripts else ' '.join(c.argv[:3])}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[_label(c) for c in COMMANDS])
def test_documented_command_parses(cmd):
    error = check_command(cmd)
    assert error is None, f"{cmd.where}: {cmd.text}\n    -> {error}"


# ---------------------------------------------------------------------------------------------
# The checker itself, on made-up snippets: it must not pass vacuously


def _errors(snippet: str) -> list[str]:
    return [f"{c.where}: {e}" for c in commands_in(snippet, "fake.md") if (e := check_command(c)) is not None]


def test_checker_catches_bad_flags():
    good = ("```bash\n"
            "python3 clustering.py --dataset data/sample_train.json --num_clusters 30 --output_name sample\n"
            "HF_HUB_OFFLINE=1 python3 subset.py --dataset d.json --scores s.parquet --lp1 --percentage 10 \\\n"
            "    --exclude_unlearned   # a comment\n"
            "torchrun --nproc_per_node 2 --master_port=1234 train.py --model_name_or_path m --data_path d.json \\\n"
            "    --evaluation_strategy no --warmup_ratio 0.03 --fsdp \"full_shard auto_wrap\" \\\n"
            "    --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --gradient_checkpointing True\n"
            "python3 train.py ... --resume_from_checkpoint last   # elided\n"
            "QS_RECORDS=120 QS_FRESH=1 bash examples/quickstart.sh\n"
            "```\n")
    assert len(commands_in(good, "fake.md")) == 5
    assert _errors(good) == []
    bad = ("```bash\n"
           "python3 clustering.py --dataset d.json --num_clusters 30 --no_such_flag 1\n"     # line 2: unknown
           "python3 clustering.py --dataset d.json\n"                                        # 3: --num_clusters
           "python3 subset.py --scores s.parquet --lp1 --exclude_unlearned\n"                # 4: --dataset
           "python3 train.py --model_name_or_path m --data_path d.json \\\n"                 # 5: unknown
           "    --no_such_flag 1\n"
           "python3 dump_pplxs.py --model_name_or_path m --output_dir o\n"                   # 7: --data_path
           "python3 train.py --data_path d.json --output_dir o\n"                            # 8: no model
           "python3 train.py --model_name_or_path m --data_path d.json --lora_r -1\n"        # 9: dataclass check
           "python3 train.py ... --resume_from_checkpoint last\n"                            # 10: unmarked ...
           "python3 evaluate.py ... --no_such_flag   # elided\n"                             # 11: unknown
           "QS_NO_SUCH_VAR=1 bash examples/quickstart.sh\n"                                  # 12: unread var
           "python3 no_such_script.py --x 1\n"                                               # 13: no script
           "python3 clustering.py --dataset d.json --num_clust 30\n"                         # 14: abbreviated
           "```\n")
    errors = _errors(bad)
    assert [e.split(":")[1] for e in errors] == [str(n) for n in range(2, 15) if n != 6], "\n".join(errors)
    assert "no_such_flag" in errors[0] and "--num_clusters" in errors[1] and "--dataset" in errors[2]
    assert "no_such_flag" in errors[3] and "--data_path" in errors[4] and "--model_name_or_path" in errors[5]
    assert "lora_r" in errors[6] and "elided" in errors[7] and "no_such_flag" in errors[8]
    assert "QS_NO_SUCH_VAR" in errors[9] and "--num_clust" in errors[11]


def test_the_docs_exercise_every_script():
    """Every pipeline script appears in at least one fully checked (not elided) command."""
    seen = set()
    for c in COMMANDS:
        if not c.elided:
            seen.update(os.path.basename(a) for a in c.argv if a.endswith(".py"))
    assert set(PIPELINE_SCRIPTS) <= seen, f"never shown in full: {sorted(set(PIPELINE_SCRIPTS) - seen)}"


# ---------------------------------------------------------------------------------------------
# The README's first screen and the links between the documents


def test_readme_first_screen():
    """The first 40 lines hold the quickstart, the install and test commands exactly as .ci/run runs them, and
    the real job's block (the paper's commands, steps 1-5) at least as far as step 2."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [ln.strip() for ln in f]
    tests = [ln for ln in ci if ln.startswith("python3 -m pytest")]
    assert tests, ".ci/run runs no pytest command"
    assert any(ln.startswith("python3 -m pip install") and "-r requirements.txt" in ln for ln in ci)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = [c for c in commands_in("\n".join(lines), "README.md") if int(c.where.split(":")[1]) <= 40]
    argvs = [c.argv for c in first]
    assert ("bash", "examples/quickstart.sh") in argvs, "the quickstart is not on the README's first screen"
    assert tuple(shlex.split(tests[-1])) in argvs, f"README's first screen lacks .ci/run's {tests[-1]!r}"
    assert ("python3", "-m", "pip", "install", "-r", "requirements.txt") in argvs
    for script in ("clustering.py", "dump_pplxs.py"):
        assert any(script in c.argv for c in first), f"the real job's {script} is not on the first screen"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading (lower case, punctuation dropped, spaces to hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _without_code(text: str) -> str:
    """The text with fenced blocks blanked out (line numbers kept)."""
    return re.sub(r"^\s*(```|~~~).*?^\s*\1[^\n]*$", lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.S | re.M)


def test_links_resolve():
    """Every relative Markdown link of README.md and docs/*.md names an existing file (and heading)."""
    bad = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            prose = _without_code(f.read())
        for m in re.finditer(r"\]\(([^)\s]+)\)", prose):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            where = f"{os.path.relpath(path, ROOT)}:{prose[: m.start()].count(chr(10)) + 1}"
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                bad.append(f"{where}: {target}: no such file")
            elif anchor and dest.endswith(".md"):
                with open(dest, encoding="utf-8") as f:
                    heads = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", _without_code(f.read()), flags=re.M)}
                if anchor not in heads:
                    bad.append(f"{where}: {target}: no heading #{anchor}")
    assert not bad, "\n".join(bad)
