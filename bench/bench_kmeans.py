"""Benchmark step 1's k-means: faiss (clustering.kmeans, with clustering.py's defaults) against scikit-learn's
KMeans as the paper's code calls it: KMeans(n_clusters=K, init="k-means++", n_init=1, random_state=seed), with
scikit-learn's default max_iter=300 and tol=1e-4. Same embeddings, same K, same seed.

    python bench/bench_kmeans.py                           # 52,000 x 384 synthetic embeddings, K = 1000 (minutes)
    python bench/bench_kmeans.py --n 10000 --k 200         # quicker (seconds; the target is for the full size)
    python bench/bench_kmeans.py --embeddings clustering/alpaca-embeddings.npy --k 1000   # real ones (clustering.py --save_embeddings)
    python bench/bench_kmeans.py --init random             # faiss' own random start instead of k-means++

Synthetic embeddings (``synthetic``): a stand-in for unit-length all-MiniLM-L6-v2 sentence embeddings. A shared
mean direction (sentence embeddings are anisotropic), 50 "topics", 2,000 "sub-topic" centres around them with
Pareto-distributed sizes, and per-point noise, all Gaussian with a decaying spectrum (variance of dimension i
~ 1/i, as real embeddings concentrate in few directions), added and projected to the unit sphere. Average
cosine between two points ~0.11, to the nearest of 3,000 others ~0.66 (variance shares: mean 0.2, topic 0.3,
sub-topic 0.3, noise 0.5).

Prints both times, both inertias (sum of squared distances to the nearest centroid, computed the same way for
both), the speed ratio and the inertia difference, and the load average (the machine may be shared: compare
figures taken at the same load). Target: faiss >= 10x faster at an inertia <= 1.01 x scikit-learn's.
scikit-learn is optional (pip install scikit-learn); it is only needed here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large.kmeans import kmeans  # noqa: E402


def synthetic(n: int, d: int, n_topics: int = 50, n_centres: int = 2000, seed: int = 0) -> np.ndarray:
    """n unit-length float32 vectors of size d, clustered like sentence embeddings (see the module docstring)."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1) ** -0.5
    scale /= np.sqrt((scale ** 2).mean())                      # per-dimension std, mean variance 1

    def gauss(m: int, var: float) -> np.ndarray:             # m vectors of expected squared norm var
        return rng.normal(size=(m, d)) * scale * np.sqrt(var / d)

    mean = gauss(1, 0.2)[0]
    topics = gauss(n_topics, 0.3)
    centres = topics[rng.integers(0, n_topics, n_centres)] + gauss(n_centres, 0.3)
    size = rng.pareto(1.5, n_centres) + 1.0
    x = mean + centres[rng.choice(n_centres, n, p=size / size.sum())] + gauss(n, 0.5)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, _ = index.search(x, 1)
    return float(dist[:, 0].astype(np.float64).sum())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=52000, help="synthetic embeddings (Alpaca: 52,002)")
    ap.add_argument("--dim", "--d", type=int, default=384, help="embedding size (all-MiniLM-L6-v2: 384)")
    ap.add_argument("--k", type=int, default=1000, help="clusters (paper: 1000 for Alpaca, 300 for Dolly)")
    ap.add_argument("--seed", type=int, default=42, help="k-means seed for both (paper: 42)")
    ap.add_argument("--embeddings", help=".npy embeddings to use instead of synthetic ones")
    ap.add_argument("--niter", type=int, default=10, help="faiss Lloyd iterations (clustering.py default 10)")
    ap.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++", help="faiss start (clustering.py --init)")
    ap.add_argument("--init_sample", type=int, default=8,
                    help="k-means++ seeding on this many points per cluster (clustering.py default 8; 0: all points)")
    ap.add_argument("--n_local_trials", type=int, default=3,
                    help="greedy k-means++ candidates per centre (clustering.py default 3; 0: scikit-learn's 2 + ln K)")
    ap.add_argument("--nredo", type=int, default=1, help="faiss restarts with --init random (default 1)")
    ap.add_argument("--skip_sklearn", action="store_true", help="time faiss only")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    x = np.load(a.embeddings, allow_pickle=False).astype(np.float32) if a.embeddings else synthetic(a.n, a.dim)
    n, d = x.shape
    src = a.embeddings or "synthetic"
    print(f"{n} x {d} embeddings ({src}), K = {a.k}, seed {a.seed}; {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    import faiss  # noqa: F401  (imported before timing, as scikit-learn is below)

    rows = []
    t = time.perf_counter()
    _, cent_f, _ = kmeans(x, a.k, seed=a.seed, niter=a.niter, nredo=a.nredo, init=a.init,
                          init_sample=a.init_sample, n_local_trials=a.n_local_trials)
    rows.append((f"faiss ({a.init}, {a.niter} it)", time.perf_counter() - t, inertia(x, cent_f), os.getloadavg()[0]))
    print(f"{rows[-1][0]:28s} {rows[-1][1]:8.2f} s   inertia {rows[-1][2]:.2f}", flush=True)
    if not a.skip_sklearn:
        try:
            from sklearn.cluster import KMeans
        except ImportError:
            sys.exit("scikit-learn is not installed (pip install scikit-learn), or pass --skip_sklearn")
        t = time.perf_counter()
        km = KMeans(n_clusters=a.k, init="k-means++", n_init=1, random_state=a.seed).fit(x)
        rows.append((f"scikit-learn ({km.n_iter_} it)", time.perf_counter() - t, inertia(x, km.cluster_centers_),
                     os.getloadavg()[0]))
    print(f"\n{'':28s} {'time (s)':>9s} {'inertia':>12s} {'load':>5s}")
    for name, t, i, load in rows:
        print(f"{name:28s} {t:9.2f} {i:12.2f} {load:5.1f}")
    if len(rows) == 2:
        (_, t_f, i_f, _), (_, t_s, i_s, _) = rows
        ok = t_s / t_f >= 10 and i_f <= 1.01 * i_s
        print(f"faiss is {t_s / t_f:.1f}x faster; inertia faiss / scikit-learn = {i_f / i_s:.4f} "
              f"({100 * (i_f - i_s) / i_s:+.2f}%); target (>= 10x, <= +1%): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
