"""clustering.py: the embedded text, seeded faiss k-means, the paper's pickle format, re-clustering."""

import json
import os
import pickle

import numpy as np
import pytest

import clustering
from small2large import dumps, embedding, kmeans
from utils import UserError, safe_load_pickle


def _blobs(n_per=40, k=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 0.3, (n_per, d)) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(k), n_per)
    perm = rng.permutation(len(x))
    return x[perm], truth[perm]


def test_embed_sentence_is_the_papers_text():
    r = {"instruction": "  Add the numbers. ", "input": " 2 and 3\n", "output": "\n5 "}
    assert embedding.embed_sentence(r) == "Instruction: Add the numbers. 2 and 3 Response: 5"
    r = {"instruction": "Name a colour.", "input": "", "output": "Red."}
    assert embedding.embed_sentence(r) == "Instruction: Name a colour. Response: Red."   # no double space
    r = {"instruction": "", "input": "only input", "output": ""}
    assert embedding.embed_sentence(r) == "Instruction: only input Response: "


def test_kmeans_recovers_blobs_and_is_deterministic():
    x, truth = _blobs()
    lab, cent, inertia = kmeans.kmeans(x, 5, seed=42, nredo=10)
    # every blob is exactly one cluster (the best of 10 restarts; one random start may merge two blobs)
    assert len({(t, c) for t, c in zip(truth.tolist(), lab.tolist())}) == 5
    assert cent.shape == (5, 16)
    assert inertia == pytest.approx(float(((x - cent[lab]) ** 2).sum()), rel=1e-4)
    lab2, _, inertia2 = kmeans.kmeans(x.copy(), 5, seed=42, nredo=10)
    assert np.array_equal(lab, lab2) and inertia == inertia2
    one = [kmeans.kmeans(x, 5, seed=7)[0] for _ in range(2)]   # one start: still the same labels twice
    assert np.array_equal(one[0], one[1])
    with pytest.raises(UserError, match="between 1 and the number of records"):
        kmeans.kmeans(x[:4], 5)


def _dataset(tmp_path, n):
    recs = [{"instruction": f"Question {i}?", "input": "" if i % 2 else f"ctx {i}", "output": f"Answer {i}."} for i in range(n)]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(recs))
    return str(p), recs


def test_main_from_saved_embeddings_writes_the_papers_format(tmp_path, capsys):
    x, truth = _blobs(n_per=10, k=4, d=8)
    ds, recs = _dataset(tmp_path, len(x))
    np.save(tmp_path / "emb.npy", x)
    out = tmp_path / "clus"
    res = clustering.main(["--dataset", ds, "--num_clusters", "4", "--output_name", "tiny", "--output_dir", str(out),
                           "--embeddings", str(tmp_path / "emb.npy"), "--nredo", "10"])
    path = out / "tiny-clustering.pkl"
    loaded = safe_load_pickle(path)   # plain ints and strings: the safe loader accepts it
    assert loaded == res
    assert [set(r) for r in loaded] == [{"embed_sentence", "cluster_num"}] * len(x)
    assert all(type(r["cluster_num"]) is int for r in loaded)
    assert [r["embed_sentence"] for r in loaded] == [embedding.embed_sentence(r) for r in recs]
    assert len({(t, r["cluster_num"]) for t, r in zip(truth.tolist(), loaded)}) == 4
    assert dumps.load_clustering(path).tolist() == [r["cluster_num"] for r in loaded]
    with open(path, "rb") as f:   # also an ordinary pickle, as the paper's files are
        assert pickle.load(f) == loaded
    # re-cluster with another K from the same embeddings
    clustering.main(["--dataset", ds, "--num_clusters", "2", "--output_name", "k2", "--output_dir", str(out),
                     "--embeddings", str(tmp_path / "emb.npy")])
    assert {r["cluster_num"] for r in safe_load_pickle(out / "k2-clustering.pkl")} == {0, 1}


def test_bad_usage(tmp_path):
    ds, _ = _dataset(tmp_path, 6)
    np.save(tmp_path / "emb.npy", np.zeros((6, 4), np.float32))
    with pytest.raises(UserError, match="larger than the number of records"):
        clustering.main(["--dataset", ds, "--num_clusters", "7", "--output_dir", str(tmp_path / "o")])
    np.save(tmp_path / "bad.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(UserError, match="does not match 6 records"):
        clustering.main(["--dataset", ds, "--num_clusters", "2", "--embeddings", str(tmp_path / "bad.npy"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        clustering.parse_args(["--dataset", ds, "--num_clusters", "0"])
    assert not (tmp_path / "o").exists()


def test_model_checksum_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(embedding, "MINILM_SHA256", "0" * 64)
    with pytest.raises(UserError, match="sha256"):
        embedding.default_model_path()


def _mixed_length_records():
    """Records whose embedded text is short (< 32 word pieces), medium (60-200) and long (> 300): the long
    ones are cut at 256 word pieces by the paper's embedder, the medium ones are not."""
    words = ["river", "stone", "lantern", "orchard", "violet", "engine", "harbor", "quiet", "copper", "meadow",
             "thunder", "pencil", "garden", "silver", "window", "mountain"]

    def text(n, shift):
        return " ".join(words[(i * 7 + shift) % len(words)] for i in range(n))

    return [
        {"instruction": "Question 1?", "input": "", "output": "Answer 1."},
        {"instruction": "Name a colour.", "input": "ctx", "output": "Red."},
        {"instruction": "Describe the scene.", "input": text(40, 1), "output": text(60, 2)},
        {"instruction": "Summarise the text.", "input": text(90, 3), "output": text(30, 4)},
        {"instruction": "Continue the story.", "input": text(300, 5), "output": text(60, 6)},
        {"instruction": "Continue the story.", "input": text(300, 5), "output": text(60, 9)},
    ]


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path):
    """The packaged all-MiniLM-L6-v2 (sha256-checked) on records short, medium and longer than 256 word pieces:
    unit-length 384-d embeddings equal to the paper's, computed here with SentenceTransformer directly (its
    own max_seq_length, 256); same seed -> same labels; the saved embeddings re-cluster identically."""
    from sentence_transformers import SentenceTransformer

    recs = _mixed_length_records()
    ds = tmp_path / "d.json"
    ds.write_text(json.dumps(recs))
    sentences = [f"Instruction: {(r['instruction'] + ' ' + r['input']).strip()} Response: {r['output']}" for r in recs]
    st = SentenceTransformer(embedding.default_model_path(), device="cpu")
    assert st.max_seq_length == 256   # the model's own limit, which the paper's code used
    pieces = [len(st.tokenizer(s)["input_ids"]) for s in sentences]
    assert max(pieces[:2]) < 32 and all(60 < n < 200 for n in pieces[2:4]) and min(pieces[4:]) > 300, pieces
    ref = st.encode(sentences, batch_size=1, convert_to_numpy=True)
    # the texts of the two long records differ only after word piece 256: the paper's embeddings are equal
    assert np.allclose(ref[4], ref[5], atol=1e-6)

    out = tmp_path / "clus"
    argv = ["--dataset", str(ds), "--num_clusters", "2", "--output_name", "t", "--output_dir", str(out), "--device", "cpu",
            "--batch_size", "4"]
    a = clustering.main(argv + ["--save_embeddings"])
    emb = np.load(out / "t-embeddings.npy")
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for i, (got, want) in enumerate(zip(emb, ref)):
        err = float(np.abs(got - want).max())
        assert err < 1e-5, (f"record {i} ({pieces[i]} word pieces): embedding differs from SentenceTransformer's by {err:.2g}: "
                            "wrong text, model or max_seq_length (truncation)?")
    b = clustering.main(["--dataset", str(ds), "--num_clusters", "2", "--output_name", "t2", "--output_dir", str(out),
                         "--embeddings", str(out / "t-embeddings.npy")])
    assert [r["cluster_num"] for r in a] == [r["cluster_num"] for r in b]
    assert sorted(os.listdir(out)) == ["embedding-cache", "t-clustering.pkl", "t-embeddings.npy", "t2-clustering.pkl"]


def test_kmeans_plusplus_seeding():
    x, truth = _blobs(n_per=30, k=6, d=8, seed=2)
    c1 = kmeans.kmeans_plusplus(x, 6, seed=42)
    assert np.array_equal(c1, kmeans.kmeans_plusplus(x, 6, seed=42))   # deterministic
    rows = [int(np.flatnonzero((x == c).all(axis=1))[0]) for c in c1]      # centres are data points
    assert sorted(truth[rows].tolist()) == list(range(6))                  # one per well-separated blob
    lab_pp, _, in_pp = kmeans.kmeans(x, 6, seed=1)
    lab_r, _, in_r = kmeans.kmeans(x, 6, seed=1, init="random")
    assert len({(t, c) for t, c in zip(truth.tolist(), lab_pp.tolist())}) == 6
    assert in_pp <= in_r * (1 + 1e-6)


def test_kmeans_plusplus_on_a_sample_and_both_distance_paths(monkeypatch):
    x, truth = _blobs(n_per=50, k=8, d=12, seed=3)
    full = kmeans.kmeans_plusplus(x, 8, seed=5)
    sub = kmeans.kmeans_plusplus(x, 8, seed=5, max_points=40, n_local_trials=2)
    assert np.array_equal(sub, kmeans.kmeans_plusplus(x, 8, seed=5, max_points=40, n_local_trials=2))
    for c in (full, sub):   # centres are data points, one per well-separated blob, even from 40 of 400 points
        rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in c]
        assert sorted(truth[rows].tolist()) == list(range(8))
    # the all-dot-products path and the one-product-per-step path pick the same centres
    monkeypatch.setattr(kmeans, "GRAM_MAX_BYTES", 0)
    assert np.array_equal(full, kmeans.kmeans_plusplus(x, 8, seed=5))
    assert np.array_equal(sub, kmeans.kmeans_plusplus(x, 8, seed=5, max_points=40, n_local_trials=2))
    with pytest.raises(ValueError, match="at least k"):
        kmeans.kmeans_plusplus(x, 8, max_points=7)
    # kmeans: init_sample=0 seeds on all points (= kmeans_plusplus on x), the default on 8 per cluster
    lab0, _, in0 = kmeans.kmeans(x, 8, seed=5, init_sample=0, n_local_trials=0)
    lab8, _, in8 = kmeans.kmeans(x, 8, seed=5)
    for lab in (lab0, lab8):
        assert len({(t, c) for t, c in zip(truth.tolist(), lab.tolist())}) == 8
    assert in8 == pytest.approx(in0, rel=1e-5)


def test_init_flags_are_checked(tmp_path):
    ds, _ = _dataset(tmp_path, 6)
    for bad in (["--init_sample", "1"], ["--init_sample", "-1"], ["--n_local_trials", "-2"]):
        with pytest.raises(SystemExit):
            clustering.parse_args(["--dataset", ds, "--num_clusters", "2", *bad])
    a = clustering.parse_args(["--dataset", ds, "--num_clusters", "2"])
    assert (a.niter, a.init_sample, a.n_local_trials) == (10, 8, 3)


def _ambiguous(n=300, d=2, seed=0):
    """Uniform points: no cluster structure, so every start ends in another local optimum."""
    return np.random.default_rng(seed).uniform(size=(n, d)).astype(np.float32)


def _partition(labels):
    """Labels renumbered in order of first appearance: equal for the same partition under any numbering."""
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return tuple(rank[labels].tolist())


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_different_seeds_give_different_starts(init):
    x = _ambiguous()
    runs = {s: kmeans.kmeans(x, 8, seed=s, init=init) for s in range(5)}
    partitions = {_partition(lab) for lab, _, _ in runs.values()}
    inertias = {round(inertia, 6) for _, _, inertia in runs.values()}
    assert len(partitions) >= 3 and len(inertias) >= 3, (
        f"seeds 0..4 gave {len(partitions)} distinct clusterings on structureless data: kmeans() ignores its seed")
    again = kmeans.kmeans(x, 8, seed=3, init=init)   # and the same seed gives the same run
    assert np.array_equal(again[0], runs[3][0]) and again[2] == runs[3][2]


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_nredo_keeps_the_lowest_inertia_of_runs_seeded_seed_plus_r(init):
    """--nredo N: N runs seeded seed, seed+1, ..., seed+N-1 (each one equal to a single run with that seed);
    the run of lowest inertia is kept. On this data the best of 5 is strictly better than the first run."""
    x = _ambiguous()
    single = [kmeans.kmeans(x, 8, seed=1 + r, init=init) for r in range(5)]
    best = min(single, key=lambda run: run[2])   # min() keeps the first on ties, as kmeans() does
    lab, cent, inertia = kmeans.kmeans(x, 8, seed=1, nredo=5, init=init)
    assert inertia < single[0][2], (
        f"nredo=5 gave inertia {inertia:.6f}, that of the single run seeded 1 ({single[0][2]:.6f}): no restarts were made")
    assert inertia == best[2], f"nredo=5 kept inertia {inertia:.6f}, not the lowest of its runs ({best[2]:.6f})"
    assert np.array_equal(lab, best[0]) and np.array_equal(cent, best[1])
    assert inertia == pytest.approx(float(((x - cent[lab]).astype(np.float64) ** 2).sum()), rel=1e-5)
    with pytest.raises(UserError, match="--nredo"):
        kmeans.kmeans(x, 8, nredo=0)


def test_nredo_flag_reaches_kmeans(tmp_path, capsys):
    """clustering.py --nredo 5 (with the default k-means++ start) writes the best of 5 runs, not one run."""
    x = _ambiguous(n=60, d=4, seed=1)
    ds, _ = _dataset(tmp_path, len(x))
    np.save(tmp_path / "emb.npy", x)
    argv = ["--dataset", ds, "--num_clusters", "6", "--output_dir", str(tmp_path / "o"), "--embeddings", str(tmp_path / "emb.npy")]
    one = [r["cluster_num"] for r in clustering.main(argv + ["--output_name", "one"])]
    five = [r["cluster_num"] for r in clustering.main(argv + ["--output_name", "five", "--nredo", "5"])]
    assert _partition(np.array(five)) != _partition(np.array(one)), "--nredo 5 wrote the clustering of a single run"
    assert one == kmeans.kmeans(x, 6, seed=42)[0].tolist()
    lab5, _, in5 = kmeans.kmeans(x, 6, seed=42, nredo=5)
    assert five == lab5.tolist()
    assert in5 < kmeans.kmeans(x, 6, seed=42)[2]
    assert "best of 5 runs, seeds 42..46" in capsys.readouterr().out
