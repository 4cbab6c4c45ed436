"""The test harness itself (tests/conftest.py): the CI switch that turns a missing paper fixture into a
failure (pytest in a subprocess on a real test of the suite), and the `gpu` marker's skip."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_TEST = "tests/test_paper_data.py::test_gzip_dataset_is_read_like_the_plain_one"


def _pytest(args, **env):
    full = {**os.environ, **env}
    for k, v in env.items():
        if v is None:
            full.pop(k)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two pytest subprocesses, ~3 s of CPU
def test_require_paper_switch_turns_a_missing_fixture_into_a_failure(tmp_path):
    missing = str(tmp_path / "no-paper-here")
    off = _pytest([PAPER_TEST], SMALL2LARGE_PAPER_DIR=missing, SMALL2LARGE_REQUIRE_PAPER=None)
    assert off.returncode == 0 and "1 skipped" in off.stdout and missing in off.stdout, (
        f"without the switch a missing paper folder must skip the test with its path (exit {off.returncode}):\n{off.stdout}")
    on = _pytest([PAPER_TEST], SMALL2LARGE_PAPER_DIR=missing, SMALL2LARGE_REQUIRE_PAPER="1")
    assert on.returncode == 1 and "1 error" in on.stdout, (
        f"SMALL2LARGE_REQUIRE_PAPER=1 with no paper files: the paper test did not fail (exit {on.returncode}):\n{on.stdout}")
    assert f"the paper's released files are not at {missing}, and SMALL2LARGE_REQUIRE_PAPER=1 requires them" in on.stdout


def test_ci_requires_the_paper():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [ln.strip() for ln in f]
    assert "export SMALL2LARGE_REQUIRE_PAPER=1" in lines
    assert lines.index("export SMALL2LARGE_REQUIRE_PAPER=1") < lines.index("python3 -m pytest -q")


class _Item:
    def __init__(self, gpu):
        self.gpu, self.added = gpu, []

    def get_closest_marker(self, name):
        return pytest.mark.gpu.mark if name == "gpu" and self.gpu else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_marker_skips_without_cuda_with_a_reason(cuda, monkeypatch):
    """conftest's collection hook on gpu-marked and other items: without CUDA the gpu ones get a skip with
    its reason (or, with SMALL2LARGE_REQUIRE_GPU=1, the run stops with a usage error); with CUDA they run."""
    import torch

    import tests.conftest as conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(conftest, "REQUIRE_GPU", False)
    items = [_Item(gpu=True), _Item(gpu=False), _Item(gpu=True)]
    conftest.pytest_collection_modifyitems(None, items)
    assert items[1].added == []
    for item in (items[0], items[2]):
        if cuda:
            assert item.added == []
        else:
            (mark,) = [m.mark for m in item.added]
            assert mark.name == "skip"
            assert mark.kwargs["reason"] == "marked gpu: needs CUDA, and torch.cuda.is_available() is False"
    monkeypatch.setattr(conftest, "REQUIRE_GPU", True)
    if cuda:
        conftest.pytest_collection_modifyitems(None, [_Item(gpu=True)])
    else:
        with pytest.raises(pytest.UsageError, match="SMALL2LARGE_REQUIRE_GPU=1"):
            conftest.pytest_collection_modifyitems(None, [_Item(gpu=True)])
