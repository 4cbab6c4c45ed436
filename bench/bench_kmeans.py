"""Benchmark step 1's k-means: faiss (clustering.py) against scikit-learn's KMeans (the paper's), on the same
embeddings, K and number of iterations; one initialisation each (n_init=1), both greedy k-means++ by default
(--init random: faiss' own random start, faster but ~1% higher inertia).

    python bench/bench_kmeans.py                           # 52,000 x 384 synthetic embeddings, K = 1000
    python bench/bench_kmeans.py --n 10000 --k 200         # quicker
    python bench/bench_kmeans.py --embeddings clustering/alpaca-embeddings.npy   # real ones (clustering.py --save_embeddings)

Synthetic embeddings: unit-length float32 vectors drawn around 2,000 random centres (clustered, like sentence
embeddings). Prints both times, both inertias (sum of squared distances to the nearest centroid, computed the
same way for both) and the ratios. Target: faiss >= 10x faster at an inertia within 1% of scikit-learn's.
scikit-learn is optional (pip install scikit-learn); it is only needed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clustering import kmeans  # noqa: E402


def synthetic(n: int, d: int, n_centres: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d)).astype(np.float32)
    x = centres[rng.integers(0, n_centres, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, _ = index.search(x, 1)
    return float(dist[:, 0].astype(np.float64).sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=52000, help="synthetic embeddings (Alpaca: 52,002)")
    ap.add_argument("--d", type=int, default=384, help="embedding size (all-MiniLM-L6-v2: 384)")
    ap.add_argument("--k", type=int, default=1000, help="clusters (paper: 1000 for Alpaca)")
    ap.add_argument("--niter", type=int, default=25, help="iterations for both (faiss default 25)")
    ap.add_argument("--seed", type=int, default=42, help="seed for both (paper: 42)")
    ap.add_argument("--embeddings", help=".npy embeddings to use instead of synthetic ones")
    ap.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++", help="faiss start (clustering.py --init)")
    ap.add_argument("--skip_sklearn", action="store_true", help="time faiss only")
    a = ap.parse_args(argv)
    x = np.load(a.embeddings).astype(np.float32) if a.embeddings else synthetic(a.n, a.d)
    n, d = x.shape
    print(f"{n} x {d} embeddings, K = {a.k}, {a.niter} iterations, 1 initialisation; {os.cpu_count()} CPU cores")

    t = time.perf_counter()
    _, cent_f, _ = kmeans(x, a.k, seed=a.seed, niter=a.niter, init=a.init)
    t_f = time.perf_counter() - t
    in_f = inertia(x, cent_f)
    print(f"faiss ({a.init}): {t_f:8.2f} s   inertia {in_f:.2f}", flush=True)
    if a.skip_sklearn:
        return
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        sys.exit("scikit-learn is not installed (pip install scikit-learn), or pass --skip_sklearn")
    t = time.perf_counter()
    km = KMeans(n_clusters=a.k, n_init=1, max_iter=a.niter, tol=0.0, random_state=a.seed).fit(x)
    t_s = time.perf_counter() - t
    in_s = inertia(x, km.cluster_centers_)
    print(f"scikit-learn: {t_s:8.2f} s   inertia {in_s:.2f}   ({km.n_iter_} iterations)")
    print(f"faiss is {t_s / t_f:.1f}x faster; inertia faiss / scikit-learn = {in_f / in_s:.4f} "
          f"({100 * (in_f - in_s) / in_s:+.2f}%)")


if __name__ == "__main__":
    main()
