"""The test harness itself (tests/conftest.py): the CI switch that turns a missing paper fixture into a
failure, and the `gpu` marker's skip. Each runs pytest in a subprocess on a real test of the suite."""

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


def test_require_paper_switch_turns_a_missing_fixture_into_a_failure(tmp_path):
    missing = str(tmp_path / "no-paper-here")
    off = _pytest([PAPER_TEST], SMALL2LARGE_PAPER_DIR=missing, SMALL2LARGE_REQUIRE_PAPER=None)
    assert off.returncode == 0 and "1 skipped" in off.stdout and missing in off.stdout, off.stdout + off.stderr
    on = _pytest([PAPER_TEST], SMALL2LARGE_PAPER_DIR=missing, SMALL2LARGE_REQUIRE_PAPER="1")
    assert on.returncode == 1 and "1 error" in on.stdout, on.stdout + on.stderr
    assert f"the paper's released files are not at {missing}, and SMALL2LARGE_REQUIRE_PAPER=1 requires them" in on.stdout


def test_ci_requires_the_paper():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [ln.strip() for ln in f]
    assert "export SMALL2LARGE_REQUIRE_PAPER=1" in lines
    assert lines.index("export SMALL2LARGE_REQUIRE_PAPER=1") < lines.index("python3 -m pytest -q")


@pytest.mark.slow
def test_gpu_tests_are_skipped_without_cuda_with_a_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the gpu tests run instead of being skipped")
    res = _pytest(["-m", "gpu", "tests/test_gpu.py"], SMALL2LARGE_REQUIRE_GPU=None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "marked gpu: needs CUDA, and torch.cuda.is_available() is False" in res.stdout
    assert " passed" not in res.stdout and " skipped" in res.stdout
    required = _pytest(["-m", "gpu", "tests/test_gpu.py"], SMALL2LARGE_REQUIRE_GPU="1")
    assert required.returncode != 0 and "SMALL2LARGE_REQUIRE_GPU=1" in required.stdout + required.stderr
