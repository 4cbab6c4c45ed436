"""The import graph has layers: scripts on top, the small2large/ library below them, utils.py at the
bottom. Read with ast (nothing is imported): every project import points to a strictly lower layer,
no module imports a script, there is no circle, and no project module is imported inside a function.
docs/architecture.md describes the same layers."""

import ast
import os

import pytest

from tests.conftest import ROOT

SCRIPTS = ["clustering", "dump_pplxs", "process_pickle", "subset", "train", "evaluate", "report"]

# bottom to top; a module may import only modules of lower layers
LAYERS = [
    ("ground floor", ["utils"]),
    ("formats, formulas, files", ["small2large.lp", "small2large.record_io", "small2large.dumps",
                                  "small2large.claim_files", "small2large.attention",
                                  "small2large.subset_files", "small2large.legacy_flags",
                                  "small2large.embedding", "small2large.kmeans", "small2large.losses"]),
    ("records to tokens, manifests, claims", ["small2large.rendering", "small2large.manifest", "small2large.claims"]),
    ("batches, ranking files, checkpoints", ["small2large.batching", "small2large.packing", "small2large.rankings",
                                            "small2large.checkpoints"]),
    ("models, the scoring engine, budget micro-batches", ["small2large.models", "small2large.scoring",
                                                         "small2large.budget_trainer"]),
    ("score tables, fine-tuning, generation", ["small2large.score_table", "small2large.finetune",
                                                "small2large.generation"]),
    ("selection, epoch dumps, the judge", ["small2large.selection", "small2large.epoch_dumps", "small2large.judge"]),
    ("report statistics, evaluation runs", ["small2large.report_stats", "small2large.evaluation"]),
    ("the report document", ["small2large.report_doc"]),
    ("scripts", SCRIPTS),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def project_modules(root: str) -> dict[str, str]:
    """{module name: file} of the scripts, utils.py and every small2large/ module under ``root``."""
    out = {m: os.path.join(root, f"{m}.py") for m in ["utils", *SCRIPTS]}
    pkg = os.path.join(root, "small2large")
    for name in sorted(os.listdir(pkg)) if os.path.isdir(pkg) else ():
        if name.endswith(".py") and name != "__init__.py":
            out[f"small2large.{name[:-3]}"] = os.path.join(pkg, name)
    return {m: f for m, f in out.items() if os.path.isfile(f)}


def imports(path: str, known) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function or class) for every import in ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in known:
                out.append((n, node.lineno, id(node) in nested))
    return out


def problems(root: str, layer: dict[str, int]) -> list[str]:
    """Every breach of the rules, one line each naming the file and line."""
    mods = project_modules(root)
    out, graph = [], {m: set() for m in mods}
    for m, path in mods.items():
        rel = os.path.relpath(path, root)
        if m not in layer:
            out.append(f"{rel}: module {m} has no layer in tests/test_layers.py LAYERS (and docs/architecture.md)")
            continue
        for dep, line, nested in imports(path, mods):
            graph[m].add(dep)
            if nested:
                out.append(f"{rel}:{line}: imports {dep} inside a function (project imports go at the top)")
            if m in SCRIPTS and dep in SCRIPTS:
                out.append(f"{rel}:{line}: the script {m} imports the script {dep}")
            elif dep in layer and layer[dep] >= layer[m]:
                out.append(f"{rel}:{line}: {m} (layer {layer[m]}) imports {dep} (layer {layer[dep]}): "
                           "imports point only downward")
    out += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return out


def circles(graph: dict[str, set]) -> list[list[str]]:
    """One cycle per strongly connected set of modules that import each other (depth-first search)."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_import_graph_points_only_downward():
    found = problems(ROOT, LAYER)
    assert not found, "\n".join(found)


def test_every_library_module_has_a_layer_and_utils_imports_nothing_of_the_project():
    mods = project_modules(ROOT)
    assert {m for m in mods if m.startswith("small2large.")} <= set(LAYER)
    assert not imports(mods["utils"], mods)


def _write(root, files: dict[str, str]):
    os.makedirs(os.path.join(root, "small2large"), exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            f.write(text)


@pytest.mark.parametrize("files, expected", [
    ({"small2large/a.py": "from small2large import b\n", "small2large/b.py": "import small2large.a\n"},
     "import circle: small2large.a -> small2large.b -> small2large.a"),
    ({"small2large/a.py": "import utils\n", "utils.py": "from small2large.a import x\n"},
     "utils.py:1: utils (layer 0) imports small2large.a (layer 1): imports point only downward"),
    ({"train.py": "import subset\n", "subset.py": "\n"}, "train.py:1: the script train imports the script subset"),
    ({"small2large/b.py": "import os\n\n\ndef f():\n    from small2large import a\n", "small2large/a.py": ""},
     "small2large/b.py:5: imports small2large.a inside a function"),
    ({"small2large/c.py": ""}, "small2large/c.py: module small2large.c has no layer"),
])
def test_the_checker_names_each_kind_of_breach_with_its_line(tmp_path, files, expected):
    _write(str(tmp_path), files)
    layer = {"utils": 0, "small2large.a": 1, "small2large.b": 2, "train": 3, "subset": 3}
    found = problems(str(tmp_path), layer)
    assert any(p.startswith(expected) for p in found), found
