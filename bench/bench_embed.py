r"""Benchmark: step 1's embedding (clustering.embed_with_cache) vs plain SentenceTransformer.encode, same records.

    # the README's CPU figure: the first 1,000 of the paper's Alpaca records
    python bench/bench_embed.py --data data/alpaca_data.json
    # quick run on the shipped sample data
    python bench/bench_embed.py --n_records 300

Four timings, each from a cold start of the step (model loading and, for ours, the sha256 check of the
packaged all-MiniLM-L6-v2 and reading / writing the cache included), on the same records:

* plain: ``SentenceTransformer(model).encode(texts)`` with its default settings (batch 32, the model's
  max length 256): what the paper's clustering.py does;
* ours, first run: clustering.py's embedding with an empty cache (distinct texts only, longest first,
  the cache written every 4,096 texts);
* ours, re-run: the same records again (another K or seed): everything read from the cache;
* ours, --new_share of the records replaced by unseen ones: only those are embedded.

Records per second count every record of the run (cached or not), so the ratios are what a user waits.
Also printed: the largest difference between plain and our embeddings, and how many records change
cluster between the two (faiss k-means, K = records / 20, same seed). sentence-transformers' faster
backends (ONNX, OpenVINO, quantized ONNX) need onnxruntime / optimum / openvino: the script says whether
they are installed (they are not pinned in requirements.txt).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large import embedding, kmeans
from small2large.record_io import load_records  # noqa: E402
from utils import UserError, run_cli

BACKEND_PACKAGES = {"onnx": ["onnxruntime", "optimum"], "openvino": ["openvino", "optimum"]}


def changed_clusters(a, b, k: int) -> int:
    """Records whose cluster differs between two labelings of the same records, once the cluster numbers
    are matched one to one (Hungarian matching on the contingency table; numbering is arbitrary).

    >>> import numpy as np
    >>> changed_clusters(np.array([0, 0, 1, 1, 2]), np.array([1, 1, 0, 0, 0]), 3)
    1
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    r, c = linear_sum_assignment(-table)
    return int(len(a) - table[r, c].sum())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/sample_train.json",
                   help="dataset (JSON list / JSONL, .gz ok); e.g. data/alpaca_data.json")
    p.add_argument("--n_records", type=int, default=1000, help="the first N records are embedded (1000)")
    p.add_argument("--new_share", type=float, default=0.05,
                   help="share of the records replaced by unseen ones in the last run (0.05)")
    p.add_argument("--batch_size", type=int, default=32, help="ours: texts per batch (32, encode's default)")
    p.add_argument("--max_seq_length", type=int, default=256, help="word pieces per text (256, the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.n_records < 40 or not 0 < args.new_share < 1:
        p.error("--n_records must be >= 40 and --new_share in (0, 1)")
    return args


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = max(1, round(args.new_share * args.n_records))
    records = load_records(args.data)[: args.n_records + n_new]
    if len(records) < args.n_records + n_new:
        raise UserError(f"{args.data}: needs {args.n_records + n_new} records, has {len(records)}")
    texts = [embedding.embed_sentence(r) for r in records]
    base, shifted = texts[: args.n_records], texts[n_new: args.n_records + n_new]
    print(f"data: {len(base)} records of {args.data} ({len(set(base))} distinct texts), device {args.device}, "
          f"{torch.get_num_threads()} threads")
    path = embedding.default_model_path()
    rows = []

    t = time.perf_counter()
    plain = SentenceTransformer(path, device=args.device).encode(base)
    rows.append(("plain encode", len(base), time.perf_counter() - t))

    def ours(label, texts_, cache_dir):
        t = time.perf_counter()
        path_, sha = embedding.embedding_model(None)
        emb, st = embedding.embed_with_cache(texts_, path_, sha, args.batch_size, args.max_seq_length,
                                              args.device, cache_dir)
        rows.append((label, st["embedded"], time.perf_counter() - t))
        return emb

    with tempfile.TemporaryDirectory() as cache:
        first = ours("ours, first run", base, cache)
        again = ours("ours, re-run", base, cache)
        ours(f"ours, {n_new} new records", shifted, cache)
    assert np.array_equal(first, again)
    k = max(2, len(base) // 20)
    lab_plain = kmeans.kmeans(plain, k, seed=42)[0]
    lab_ours = kmeans.kmeans(first, k, seed=42)[0]
    print(f"{'':26}{'texts embedded':>16}{'seconds':>10}{'records/s':>11}{'vs plain':>10}")
    t_plain = rows[0][2]
    for label, n_emb, sec in rows:
        print(f"{label:26}{n_emb:>16}{sec:>10.2f}{len(base) / sec:>11.1f}{t_plain / sec:>9.2f}x")
    print(f"largest |plain - ours| over the embeddings: {float(np.abs(plain - first).max()):.1e}; records in "
          f"another cluster (K={k}, seed 42): {changed_clusters(lab_plain, lab_ours, k)} of {len(base)}")
    for backend, pkgs in BACKEND_PACKAGES.items():
        missing = [m for m in pkgs if importlib.util.find_spec(m) is None]
        print(f"sentence-transformers backend {backend!r}: "
              + (f"not available here ({', '.join(missing)} not installed)" if missing else "installed"))
    return {name: len(base) / sec for name, _, sec in rows}


if __name__ == "__main__":
    sys.exit(run_cli(main))
