"""Step 1's k-means: faiss k-means over the embeddings, seeded with k-means++ (numpy), the same
labels for the same inputs and seed."""

from __future__ import annotations

import math

import numpy as np

from utils import UserError

GRAM_MAX_BYTES = 1 << 29  # k-means++ keeps all dot products of its sample when they fit in 512 MiB (8,000 points: 256 MiB)


def kmeans_plusplus(x: np.ndarray, k: int, seed: int = 42, n_local_trials: int | None = None,
                    max_points: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (the initialisation of scikit-learn's KMeans, which the paper used): each new
    centre is the best of ``n_local_trials`` (default 2 + ln(k), as scikit-learn) candidates drawn with
    probability proportional to the squared distance to the nearest centre so far. With ``max_points``, the
    seeding runs on that many rows drawn at random (the Lloyd iterations that follow still use every row).
    Returns k rows of ``x`` (float32). Deterministic for a seed.

    >>> x = np.array([[0, 0], [0, 1], [10, 0], [10, 1]], dtype=np.float32)
    >>> c = kmeans_plusplus(x, 2, seed=0)
    >>> sorted(int(v) for v in c[:, 0])   # one centre in each pair
    [0, 10]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if max_points is not None and max_points < len(x):
        if max_points < k:
            raise ValueError(f"max_points ({max_points}) must be at least k ({k})")
        x = x[np.sort(rng.choice(len(x), max_points, replace=False))]
    n = len(x)
    trials = n_local_trials or 2 + int(np.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    if 4 * n * n <= GRAM_MAX_BYTES:   # all dot products in one matrix product, then k cheap steps
        gram = x @ x.T

        def dots(rows):
            return gram[rows]
    else:                             # one small matrix product per step

        def dots(rows):
            return x[rows] @ x.T

    def dist2(rows):                  # squared distances from x[rows] to every row: len(rows) x n
        return np.maximum(sq[rows][:, None] + sq[None, :] - 2.0 * dots(rows), 0.0)

    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centres[0] = x[first]
    closest = dist2(np.array([first]))[0]
    pot = float(closest.sum(dtype=np.float64))
    for c in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        cand = np.minimum(np.searchsorted(cum, rng.uniform(size=trials) * pot), n - 1)
        dist = np.minimum(closest[None, :], dist2(cand))   # trials x n: nearest-centre distance with each candidate
        pots = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(pots))
        closest, pot = dist[best], float(pots[best])
        centres[c] = x[cand[best]]
    return centres


def kmeans(x: np.ndarray, k: int, seed: int = 42, niter: int = 10, nredo: int = 1, verbose: bool = False,
           init: str = "kmeans++", init_sample: int = 8, n_local_trials: int = 3):
    """faiss k-means on the rows of ``x``; every point takes part in the Lloyd iterations (no sub-sampling).

    ``init`` "kmeans++" (default): greedy k-means++ (as scikit-learn's KMeans) on ``init_sample * k`` random
    rows (0: on all rows, as scikit-learn: slower, at most ~0.1% lower inertia in bench/bench_kmeans.py) with ``n_local_trials``
    candidates per centre (0: scikit-learn's 2 + ln(k)). ``init`` "random": faiss' own start (k random rows);
    ~1% higher inertia. ``nredo`` runs, with either start: run r is seeded with ``seed + r`` and the run with
    the lowest inertia is kept (the first one on ties), so nredo=1 is the single run seeded with ``seed``.
    Deterministic for a seed. Returns (labels int64 [n], centroids float32 [k, d], inertia = sum of squared
    distances of the points to their centroid)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise UserError(f"--num_clusters {k} must be between 1 and the number of records ({n})")
    if init not in ("kmeans++", "random"):
        raise UserError(f"unknown k-means init {init!r} (kmeans++ or random)")
    if nredo < 1:
        raise UserError(f"--nredo must be >= 1, got {nredo}")
    best = None
    for r in range(nredo):
        run_seed = seed + r
        km = faiss.Kmeans(
            d, k, niter=niter, nredo=1, seed=run_seed, verbose=verbose,
            max_points_per_centroid=math.ceil(n / k) + 1,  # train on every point, as scikit-learn does
            min_points_per_centroid=1,  # no warning for small datasets
        )
        if init == "kmeans++":
            km.train(x, init_centroids=kmeans_plusplus(x, k, run_seed, n_local_trials=n_local_trials or None,
                                                       max_points=init_sample * k if init_sample else None))
        else:
            km.train(x)
        dist, lab = km.index.search(x, 1)
        inertia = float(dist[:, 0].astype(np.float64).sum())
        if verbose and nredo > 1:
            print(f"k-means run {r + 1}/{nredo} (seed {run_seed}): inertia {inertia:.6g}")
        if best is None or inertia < best[2]:
            best = (lab[:, 0].astype(np.int64), km.centroids, inertia)
    return best
