"""The response loss of records, shared by the padded and the packed scoring paths: which positions are
scored, the chunked float32 cross-entropy of those positions, and the per-record mean (the paper's
"nonzero" denominator or the plain mean). Pure tensor maths, no I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils import IGNORE_INDEX

DENOMINATORS = ("nonzero", "mean")


CE_CHUNK_ELEMENTS = 1 << 24  # logits (positions x vocabulary) upcast to float32 at once: 64 MiB per chunk


def scored_mask(labels: torch.Tensor) -> torch.Tensor:
    """[rows, T] bool: the positions whose next token is scored (its label is not IGNORE_INDEX).

    >>> scored_mask(torch.tensor([[-100, 5, 6], [-100, -100, 7]])).tolist()
    [[True, True, False], [False, True, False]]
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def token_losses(logits, pos, targets, chunk_elements: int = CE_CHUNK_ELEMENTS):
    """Float32 cross-entropy of the rows ``pos`` of ``logits`` (viewed as [positions, V]; ``pos`` None:
    every row, in order, e.g. logits of the scored positions only) against ``targets``, computed in
    chunks of at most ``chunk_elements`` logits, so the float32 copy and the log-softmax never exceed
    one chunk (the full float32 logits of a 128K vocabulary would take tens of GB). Each row's loss is
    computed alone, so the chunking does not change the result.

        >>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])   # ln 2, ln(1 + e^-2), ln(1 + e^-1)
        >>> token_losses(logits, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), chunk_elements=2)
        tensor([0.6931, 0.1269, 0.3133])
        >>> token_losses(logits, None, torch.tensor([0, 0, 0]))
        tensor([0.6931, 0.1269, 0.3133])
    """
    flat = logits.reshape(-1, logits.shape[-1])
    n = targets.shape[0]
    step = max(1, chunk_elements // flat.shape[-1])
    out = torch.empty(n, dtype=torch.float32, device=flat.device)
    for s in range(0, n, step):
        rows = flat[s:s + step] if pos is None else flat[pos[s:s + step]]
        out[s:s + step] = F.cross_entropy(rows.float(), targets[s:s + step], reduction="none")
    return out


def record_losses(token_loss, row, n_rows: int, denominator: str = "nonzero"):
    """Reduce per-token losses to one mean loss per record (float32), without waiting for the GPU.

    ``token_loss`` holds the cross-entropy of scored tokens only, ``row`` the record (row) each
    belongs to. denominator "nonzero": sum / number of tokens whose loss is != 0 (the paper's code);
    "mean": sum / number of scored tokens. A record with nothing to divide by gets loss 0 (perplexity
    1.0, the paper's value for a fully truncated record).

        >>> tl = torch.tensor([0.5, 0.0, 1.0]); row = torch.tensor([0, 0, 1])
        >>> record_losses(tl, row, 3, "nonzero")   # record 0: 0.5/1, record 1: 1.0/1, record 2: none
        tensor([0.5000, 1.0000, 0.0000])
        >>> record_losses(tl, row, 3, "mean")      # record 0: 0.5/2
        tensor([0.2500, 1.0000, 0.0000])
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator {denominator!r}")
    token_loss = token_loss.float()
    sums = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device).index_add_(0, row, token_loss)
    counted = torch.ones_like(token_loss) if denominator == "mean" else (token_loss != 0).float()
    counts = torch.zeros(n_rows, dtype=torch.float32, device=token_loss.device).index_add_(0, row, counted)  # exact < 2^24
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
