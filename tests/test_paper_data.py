"""The paper's own data: process_pickle.py + subset.py (a) on the released dumps regenerate every published
lp1 and lp1_approx subset of all 7 models of Alpaca and Dolly, and every Dolly clust_rand subset, as judged by
the fixture's check_subsets.py (every cluster whose published content is certain must match exactly).

Runs when ../shared/paper exists (the `paper_dir` fixture), skipped otherwise. Alpaca's clust_rand subsets
are not checked: no Alpaca cluster is provably complete, so check_subsets.py has nothing to compare (exit 3).
The 14 (dataset, model) pairs run in two worker processes; check_subsets.py runs inside them (its main()
with sys.argv set), reading the fixture's big files once per worker.
"""

import concurrent.futures
import gzip
import json
import multiprocessing
import os
import pickle

import pytest
from _step3_helpers import regenerate_and_check

pytestmark = [pytest.mark.slow, pytest.mark.paper]

MODELS = ("llama2-7b", "llama2-13b", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b")
DATASETS = ("alpaca", "dolly")


def _clustering_from_labels(paper_dir, dataset, path):
    """A clustering pickle in the paper's format from clusters.json; records of unknown cluster (null) go into
    one extra cluster numbered K, after the last (this keeps clust_rand's random stream aligned)."""
    with open(os.path.join(paper_dir, dataset, "clusters.json")) as f:
        labels = json.load(f)
    k = max(c for c in labels if c is not None) + 1
    with open(path, "wb") as f:
        pickle.dump([{"embed_sentence": "", "cluster_num": k if c is None else c} for c in labels], f)


@pytest.fixture(scope="module")
def paper_results(paper_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    jobs = {}
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for ds in DATASETS:
            clus = str(root / f"{ds}-clustering.pkl")
            _clustering_from_labels(paper_dir, ds, clus)
            with open(os.path.join(paper_dir, ds, "published.json")) as f:
                published = sorted(json.load(f)["subsets"])
            for m in MODELS:
                keys = [k for k in published if k.startswith(m + "/") and not (ds == "alpaca" and "/clust_rand/" in k)]
                jobs[(ds, m)] = pool.submit(regenerate_and_check, paper_dir, ds, m, clus, str(root / f"{ds}-{m}"), keys)
        return {k: f.result() for k, f in jobs.items()}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_published_subsets_are_regenerated(paper_results, dataset, model):
    text, written, results = paper_results[(dataset, model)]
    assert len(written) == 22   # 8 lp1 + 8 lp1_approx + 6 clust_rand splits
    n_trunc = {"alpaca": 1, "dolly": 765 if model.startswith("llama") else 544}[dataset]   # the fixture README's counts
    assert f"fully truncated records (perplexity 1.0 in every dump, LP(1) = 0): {n_trunc} records" in text
    # every available published lp1 / lp1_approx split (and every Dolly clust_rand split) is checked
    kinds = sorted({key.split("/")[1] for key, _, _ in results})
    assert len(results) == {"alpaca": 2 * 4, "dolly": 2 * 6 + 5}[dataset]
    assert kinds == (["lp1", "lp1_approx"] if dataset == "alpaca" else ["clust_rand", "lp1", "lp1_approx"])
    for key, code, report in results:
        assert code == 0, f"{key}: check_subsets.py exit {code}\n{report}"
        assert report.rstrip().endswith("PASS"), report


def test_gzip_dataset_is_read_like_the_plain_one(paper_dir, tmp_path):
    """The fixture's datasets are .json.gz; a decompressed copy loads to the same records."""
    from small2large.record_io import load_records

    src = os.path.join(paper_dir, "dolly", "data.json.gz")
    plain = tmp_path / "dolly.json"
    with gzip.open(src, "rb") as f:
        plain.write_bytes(f.read())
    assert load_records(str(plain)) == load_records(src)
