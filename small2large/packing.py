"""Token-budget packing of instruction records: fewer, fuller micro-batches in training (issue 17)
and packed rows for perplexity scoring, with the same gradients and perplexities as the padded path.

Why: at the paper's setting (4 records x 8 accumulation steps, records of ~100-400 tokens) every
micro-batch of 4 short records pays the launch and step overhead of a full forward/backward, and
right padding wastes ~40% of the tokens. Here the records of ONE optimizer step are regrouped into as
few micro-batches as fit in a token budget, each holding one or more packed rows (records one after
another, position ids restarting at 0 for every record, the first label of every record ignored).

Where a varlen kernel runs (varlen=True) a micro-batch is one row of at most ``max_tokens`` tokens.
Otherwise rows are capped (max_row_tokens; default: the longest record of the step, lowered until the
dense attention work of the packed rows is no more than the padded path's for the same records) and a
micro-batch holds several rows, rows x longest row <= max_tokens.

See small2large/attention.py for the attention paths and small2large/budget_trainer.py for the
Trainer hook and its loss normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from small2large.attention import _cu_seqlens
from small2large.losses import CE_CHUNK_ELEMENTS, record_losses, scored_mask, token_losses
from utils import IGNORE_INDEX, UserError

TOKEN_WEIGHT_KEY = "_token_weight"  # packed micro-batch key: per-label weight (loss without num_items_in_batch)


# ----------------------------------------------------------------------------------------
# Pure planning: rows and micro-batches


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most ``capacity`` in total, by first-fit decreasing: items
    longest first (ties by index), each into the first bin where it fits. An item longer than the
    capacity gets a bin of its own. Bins in the order they were opened; O(n log n) (a max-tree over
    the bins' free space finds the first fit).

    >>> first_fit_decreasing([5, 3, 8, 2, 4], 10)
    [[2, 3], [0, 4], [1]]
    >>> first_fit_decreasing([12, 3, 4], 10)   # 12 alone
    [[0], [2, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = [[i] for i in order if lengths[i] > capacity]
    fitting = [i for i in order if lengths[i] <= capacity]
    if not fitting:
        return bins
    size = 1
    while size < len(fitting):
        size *= 2
    tree = [capacity] * (2 * size)  # leaves: free space of bins 0..size-1 (unopened bins are empty)
    opened: list[list[int]] = []
    for i in fitting:
        n, node = lengths[i], 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(opened):
            opened.append([])
        opened[b].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins + opened


def group_rows(row_lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of row indices, rows longest first (ties by index), each micro-batch a run of
    them with rows x its longest row <= max_tokens (a row longer than that alone): the fewest
    micro-batches, and among those the least dense attention work (rows x longest^2), so that a long
    outlier row does not pad shorter rows to its length (a small dynamic programme; plain greedy filling
    when that would take over ~2M steps, e.g. tens of thousands of rows at a huge budget).

    >>> group_rows([10, 9, 3, 10, 4], 20)   # greedy would give [[0, 3], [1, 4], [2]]: more padding
    [[0, 3], [1], [4, 2]]
    """
    order = sorted(range(len(row_lengths)), key=lambda i: (-row_lengths[i], i))
    n = [row_lengths[i] for i in order]
    r = len(n)
    if r == 0:
        return []
    widths = [max(1, max_tokens // max(1, x)) for x in n]
    if sum(min(w, r) for w in widths) > 2_000_000:  # greedy: the fewest micro-batches too
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * row_lengths[groups[-1][0]] > max_tokens:
                groups.append([])
            if not groups:
                groups.append([])
            groups[-1].append(i)
        return groups
    best: list[tuple | None] = [(0, 0, 0)] + [None] * r  # (micro-batches, attention work, padded tokens)
    back = [0] * (r + 1)
    for j in range(r):
        c, w, p = best[j]
        for i in range(j + 1, min(r, j + widths[j]) + 1):
            k = i - j
            cand = (c + 1, w + k * n[j] * n[j], p + k * n[j])
            if best[i] is None or cand < best[i]:
                best[i], back[i] = cand, j
    out: list[list[int]] = []
    i = r
    while i:
        out.append(order[back[i]:i])
        i = back[i]
    return out[::-1]


def row_capacity(max_tokens: int, max_row_tokens: int) -> int:
    """The row length rows are packed to: max_row_tokens, lowered so that whole rows fill the budget
    (1000 tokens with rows of at most 512: two rows of 500).

    >>> row_capacity(1000, 512), row_capacity(1536, 512), row_capacity(300, 512)
    (500, 512, 300)
    """
    cap = max(1, min(max_row_tokens, max_tokens))
    return max_tokens // math.ceil(max_tokens / cap)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, max_row_tokens: int | None = None,
                       varlen: bool = False, max_attention_work: int | None = None) -> list[list[list[int]]]:
    """Micro-batches -> rows -> record indices, for records of these token lengths.

    varlen: one row per micro-batch, rows of at most ``max_tokens`` tokens (first-fit decreasing).
    Otherwise rows of at most row_capacity(max_tokens, max_row_tokens) tokens (default
    max_row_tokens: the longest record), first-fit decreasing, and rows grouped longest first with
    rows x longest row <= max_tokens (group_rows); with ``max_attention_work`` (e.g. the padded path's
    packed_attention_work for the same records) caps 15%, 28%, ... lower are tried too (down to the
    shortest record) and the plan kept is, among those whose dense attention work is within it, the one
    with the fewest micro-batches, then the fewest tokens (the least dense work when none is within). A record longer than the cap is a row of its own,
    and one longer than ``max_tokens`` a micro-batch of its own. Records are never split; within a
    row they are in decreasing length (order within a step does not change the gradient, up to rounding).

    >>> plan_micro_batches([5, 3, 8, 2, 4], max_tokens=10, varlen=True)
    [[[2, 3]], [[0, 4]], [[1]]]
    >>> plan_micro_batches([5, 3, 8, 2, 4], max_tokens=24, max_row_tokens=8)   # rows of 8, 3 per micro-batch
    [[[2], [0, 1], [4, 3]]]
    >>> plan_micro_batches([5, 3, 8, 2, 4], max_tokens=16, max_row_tokens=8)
    [[[2], [0, 1]], [[4, 3]]]
    """
    if varlen:
        return [[row] for row in first_fit_decreasing(lengths, max_tokens)]
    if not lengths:
        return []
    cap = row_capacity(max_tokens, max_row_tokens or max(lengths))
    best = None
    while True:
        rows = first_fit_decreasing(lengths, cap)
        row_len = [sum(lengths[i] for i in r) for r in rows]
        plan = [[rows[j] for j in g] for g in group_rows(row_len, max_tokens)]
        if max_attention_work is None:
            return plan
        work = sum(packed_attention_work([[lengths[i] for i in r] for r in mb], varlen=False) for mb in plan)
        key = (work > max_attention_work, len(plan), plan_tokens(lengths, plan)[0], work)
        if best is None or key < best[0]:
            best = (key, plan)
        if cap <= min(lengths) or cap <= 1:  # every record alone: lowering the cap changes nothing more
            return best[1]
        cap = max(1, int(cap * 0.85))


def split_plan(plan: list[list[list[int]]], count: int) -> list[list[list[int]]]:
    """``plan`` with at least ``count`` micro-batches (every process of a step must run as many, for
    FSDP and ZeRO-3): the micro-batch with the most records is split in two (its rows, or its single
    row's records), until none has two records; then empty micro-batches (a dummy row) are added.

    >>> split_plan([[[0, 1, 2]], [[3]]], 3)
    [[[0]], [[1, 2]], [[3]]]
    >>> split_plan([[[0]], [[1]]], 3)   # nothing left to split: an empty micro-batch
    [[[0]], [[1]], []]
    """
    plan = [list(mb) for mb in plan]
    while len(plan) < count:
        sizes = [sum(len(r) for r in mb) for mb in plan]
        j = max(range(len(plan)), key=lambda i: (sizes[i], -i)) if plan else 0
        if not plan or sizes[j] < 2:
            plan.append([])
        elif len(plan[j]) >= 2:
            h = len(plan[j]) // 2
            plan[j:j + 1] = [plan[j][:h], plan[j][h:]]
        else:
            row = plan[j][0]
            h = len(row) // 2
            plan[j:j + 1] = [[row[:h]], [row[h:]]]
    return plan


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_tokens(lengths: Sequence[int], plan: Sequence[Sequence[Sequence[int]]],
                pad_to_multiple_of: int = 1) -> tuple[int, int]:
    """(tokens run through the model, padding included; real tokens) of a plan.

    >>> plan_tokens([5, 3, 8, 2, 4], [[[2], [0, 1]], [[4, 3]]])   # 2 rows of 8, 1 row of 6
    (22, 22)
    >>> plan_tokens([5, 3, 8, 2, 4], [[[2], [0, 3]]], pad_to_multiple_of=4)   # 2 rows of 8
    (16, 15)
    """
    processed = real = 0
    for mb in plan:
        row_len = [sum(lengths[i] for i in r) for r in mb]
        if not row_len:
            continue
        processed += len(mb) * _round_up(max(row_len), pad_to_multiple_of)
        real += sum(row_len)
    return processed, real


def packed_attention_work(lengths_per_row: Sequence[Sequence[int]], varlen: bool, causal: bool = True) -> int:
    """Attention score entries computed for one micro-batch whose rows hold records of these lengths.
    varlen: every record attends only within itself: sum of l(l+1)/2 (causal) or l^2. Otherwise the
    rows are padded to the longest row T and a masked kernel computes every entry: rows x T^2 (a padded
    batch is rows of one record each). FlexAttention lies in between (blocks of 128 outside every
    document are skipped).

    >>> packed_attention_work([[3, 2], [4]], varlen=True)              # 6 + 3 + 10
    19
    >>> packed_attention_work([[3, 2], [4]], varlen=True, causal=False)  # 9 + 4 + 16
    29
    >>> packed_attention_work([[3, 2], [4]], varlen=False)             # 2 rows x 5^2
    50
    >>> packed_attention_work([[5], [2], [3]], varlen=False)           # padded: 3 rows x 5^2
    75
    """
    rows = [list(r) for r in lengths_per_row if len(r)]
    if not rows:
        return 0
    if varlen:
        return sum(n * (n + 1) // 2 if causal else n * n for r in rows for n in r)
    longest = max(sum(r) for r in rows)
    return len(rows) * longest * longest


# ----------------------------------------------------------------------------------------
# Packed tensors


@dataclass
class PackedBatch:
    """Records packed into rows of equal length T (right-padded with a dummy record of pad tokens).

    input_ids, labels, position_ids, record_index: int64 [rows, T]. labels: the records' labels with
    the first label of every record IGNORE_INDEX (nothing predicts a record's first token, as in a
    padded row), IGNORE_INDEX on padding. position_ids restart at 0 for every record and for the pad
    tail. record_index: which of the packed records (0..n_records-1, in ``order``) each token belongs
    to, -1 on padding. seq_lengths: the documents (records and pad tails) in flattened order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    record_index: torch.Tensor
    order: list[int]  # the record indices packed, in the order of record_index
    seq_lengths: list[int]
    real_tokens: int
    token_weight: torch.Tensor | None = None  # float32 [rows, T]: loss weight of each label

    @property
    def n_records(self) -> int:
        return len(self.order)

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    def model_inputs(self, varlen: bool = False) -> dict:
        """The keyword arguments of the model's forward: input_ids, labels, position_ids, use_cache=False
        (a cache switches transformers' packing detection off), no attention_mask (it would too); with
        ``varlen`` also cu_seq_lens_q/k and max_length_q/k for the varlen kernels (flash, torch_varlen)."""
        out = {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
               "use_cache": False}
        if varlen:
            lens = torch.tensor(self.seq_lengths, dtype=torch.int32)
            cu = _cu_seqlens(lens).to(self.input_ids.device)
            mx = max(self.seq_lengths)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx)
        if self.token_weight is not None:
            out[TOKEN_WEIGHT_KEY] = self.token_weight
        return out

    def scored_positions(self) -> torch.Tensor:
        """[rows, T] bool: positions whose next token is scored (label not IGNORE_INDEX). The record
        boundaries need nothing more: every record's first label is IGNORE_INDEX."""
        return scored_mask(self.labels)

    def scoring_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat row-major positions whose next token is scored, the record of each, the scored token),
        int64 [n] each, on this batch's device: made on the CPU before the batch goes to the GPU, they
        spare the GPU the boolean indexing that waits for it.

        >>> b = pack_rows([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9])], [[0, 1]], pad_token_id=0)
        >>> [t.tolist() for t in b.scoring_targets()]
        [[0, 1, 3], [0, 0, 1], [6, 7, 9]]
        """
        keep = self.scored_positions()
        flat = keep.reshape(-1).nonzero().squeeze(1)
        return flat, self.record_index.reshape(-1)[flat], self.labels[:, 1:][keep[:, :-1]]


def to_device(t: torch.Tensor | None, device, non_blocking: bool = False) -> torch.Tensor | None:
    """``t`` on ``device``; a CPU tensor bound for a GPU with ``non_blocking`` goes through pinned memory
    (an asynchronous copy: the host does not wait for the GPU's queue; torch keeps the pinned block
    until the copy is done)."""
    if t is None or t.device == torch.device(device):
        return t
    if non_blocking and t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _as_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long)
    return torch.as_tensor(x, dtype=torch.long, device=device)


def pack_rows(records: Sequence[tuple], rows: Sequence[Sequence[int]], pad_token_id: int,
              pad_to_multiple_of: int = 1, record_weights: Sequence[float] | None = None,
              device=None) -> PackedBatch:
    """Pack ``records`` ((input_ids, labels) pairs: lists or 1-D tensors) into ``rows`` (lists of
    record indices), rows right-padded to the longest row rounded up to ``pad_to_multiple_of``. Empty
    ``rows``: one dummy row of a single pad token (a micro-batch that trains nothing). Tensors are made
    on ``device`` (default: the records' device). ``record_weights``: a loss weight per record, put on
    its labels (token_weight).

    >>> b = pack_rows([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9]), ([4], [4])], [[0, 1], [2]], pad_token_id=0)
    >>> b.input_ids.tolist(), b.labels.tolist()
    ([[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]], [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]])
    >>> b.position_ids.tolist(), b.record_index.tolist(), b.seq_lengths
    ([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]], [[0, 0, 0, 1, 1], [2, -1, -1, -1, -1]], [3, 2, 1, 4])
    """
    if device is None:
        first = records[rows[0][0]][0] if rows and rows[0] else None
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    rows = [list(r) for r in rows if len(r)]
    if not rows:
        one = torch.full((1, 1), pad_token_id, dtype=torch.long, device=device)
        return PackedBatch(one, torch.full_like(one, IGNORE_INDEX), torch.zeros_like(one), torch.full_like(one, -1),
                           [], [1], 0, None if record_weights is None else torch.zeros(1, 1, device=device))
    ids = {i: _as_tensor(records[i][0], device) for r in rows for i in r}
    labs = {i: _as_tensor(records[i][1], device) for r in rows for i in r}
    row_len = [sum(ids[i].shape[0] for i in r) for r in rows]
    width = _round_up(max(row_len), pad_to_multiple_of)
    id_parts, lab_parts = [], []
    seq_lengths: list[int] = []
    record_starts: list[int] = []  # flat offset of every record's first token
    rec_of: list[int] = []
    weights: list[float] = []
    offset = k = 0
    for r, n in zip(rows, row_len):
        for i in r:
            m = ids[i].shape[0]
            id_parts.append(ids[i])
            lab_parts.append(labs[i])
            seq_lengths.append(m)
            record_starts.append(offset)
            rec_of += [k] * m
            if record_weights is not None:
                weights += [float(record_weights[i])] * m
            offset += m
            k += 1
        if width > n:  # the pad tail: a dummy record of pad tokens, attending only to itself
            id_parts.append(torch.full((width - n,), pad_token_id, dtype=torch.long, device=device))
            lab_parts.append(torch.full((width - n,), IGNORE_INDEX, dtype=torch.long, device=device))
            seq_lengths.append(width - n)
            rec_of += [-1] * (width - n)
            weights += [0.0] * (width - n)
            offset += width - n
    lens = torch.tensor(seq_lengths)
    positions = torch.arange(offset) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    labels = torch.cat(lab_parts)
    labels[torch.tensor(record_starts, device=device)] = IGNORE_INDEX  # nothing predicts a record's first token
    shape = (len(rows), width)
    return PackedBatch(
        input_ids=torch.cat(id_parts).view(shape),
        labels=labels.view(shape),
        position_ids=positions.view(shape).to(device),
        record_index=torch.tensor(rec_of, dtype=torch.long).view(shape).to(device),
        order=[i for r in rows for i in r],
        seq_lengths=seq_lengths,
        real_tokens=sum(row_len),
        token_weight=None if record_weights is None else torch.tensor(weights).view(shape).to(device),
    )


def batch_records(batch: Mapping) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The records of a collated micro-batch, as (input_ids, labels) 1-D tensors (views, same device):
    a right-padded batch {input_ids, labels, attention_mask} (the mask gives each record's length, so a
    pad id equal to eos is no problem), a packed one {input_ids, labels, position_ids} of one row
    (records start where the position ids are 0), or rows without padding. Other tensors are refused.

    >>> import torch
    >>> recs = batch_records({"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]),
    ...                       "labels": torch.tensor([[-100, 6, 7], [8, -100, -100]]),
    ...                       "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])})
    >>> [(i.tolist(), l.tolist()) for i, l in recs]
    [([5, 6, 7], [-100, 6, 7]), ([8], [8])]
    """
    known = {"input_ids", "labels", "attention_mask", "position_ids", "use_cache"}
    extra = sorted(k for k, v in batch.items() if k not in known and isinstance(v, torch.Tensor))
    if extra or "labels" not in batch or "input_ids" not in batch:
        what = f"keys {extra}" if extra else "no input_ids or labels"
        raise UserError(f"token-budget micro-batches: cannot regroup a batch with {what}; use the records' "
                        "padded collator (input_ids, labels, attention_mask)")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(1)
        right = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask.bool(), right):
            raise UserError("token-budget micro-batches need right-padded batches (the attention mask is not)")
        return [(ids[j, :n], labels[j, :n]) for j, n in enumerate(lengths.tolist())]
    pos = batch.get("position_ids")
    if pos is not None and ids.shape[0] == 1:
        starts = (pos[0] == 0).nonzero().squeeze(1).tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        ends = [*starts[1:], ids.shape[1]]
        return [(ids[0, s:e], labels[0, s:e]) for s, e in zip(starts, ends)]
    return [(ids[j], labels[j]) for j in range(ids.shape[0])]


# ----------------------------------------------------------------------------------------
# Packed scoring


def plan_scoring_batches(lengths: Sequence[int], max_tokens: int, max_row_tokens: int | None = None,
                         varlen: bool = False) -> list[list[list[int]]]:
    """The micro-batches (rows of record indices) that score a whole dataset under a token budget:
    plan_micro_batches over every record. Across thousands of records, first-fit decreasing fills rows
    to within a few tokens and rows of like length share a micro-batch, so padding stays under 1%
    at any budget (none with varlen; length-sorted padded batches reach 2-8% at budgets of 16-64K).
    With a varlen kernel this is strictly better than padded batches (half their attention work on
    Alpaca-like lengths). With a dense mask (sdpa, eager) a row of T tokens costs T^2 whatever its
    records, about twice the attention of length-sorted padded batches: keep those there.

    >>> plan_scoring_batches([30, 5, 7, 12, 20], max_tokens=40, max_row_tokens=20)
    [[[0]], [[4], [3, 2]], [[1]]]
    """
    return plan_micro_batches(lengths, max_tokens, max_row_tokens, varlen)


def packed_record_losses(logits: torch.Tensor, batch: PackedBatch, denominator: str = "nonzero",
                         chunk_elements: int = CE_CHUNK_ELEMENTS, targets: tuple | None = None,
                         scored_only: bool | None = None) -> torch.Tensor:
    """Mean response loss of every packed record (float32 [n_records], in ``batch.order``): the
    cross-entropy of each scored position t (label t+1 not IGNORE_INDEX) against label t+1, so labels
    are shifted within each record, never across (every record's first label is IGNORE_INDEX).
    ``logits``: the full [rows, T, V], or those of the scored positions only (``scored_only``; default:
    when there are fewer than rows x T), row-major, any shape [..., V], from logits_to_keep (batch.scored_positions(), or
    scoring_targets()[0] for one row). ``targets``: batch.scoring_targets() already on the logits' device
    (nothing here then waits for the GPU). ``denominator`` "nonzero": sum / tokens whose loss != 0 (the
    paper's code); "mean": sum / scored tokens. A record with nothing to divide by gets 0 (perplexity
    1.0). The logits are upcast to float32 ``chunk_elements`` at a time.

    >>> import torch
    >>> b = pack_rows([([1, 1, 1], [-100, 1, 1]), ([0, 1], [0, 1])], [[0, 1]], pad_token_id=0)
    >>> logits = torch.zeros(1, 5, 2)   # uniform: every scored token costs ln 2
    >>> packed_record_losses(logits, b).exp()   # record 0: 2 tokens, record 1: 1 (its first is not scored)
    tensor([2., 2.])
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat_pos, rec, tgt = (t.to(flat.device) for t in (batch.scoring_targets() if targets is None else targets))
    if scored_only is None:  # full logits have a row per token; the scored ones fewer (a record's first is never)
        scored_only = flat.shape[0] != batch.input_ids.numel()
    if flat.shape[0] != (tgt.shape[0] if scored_only else batch.input_ids.numel()):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {tgt.shape[0]} scored positions")
    token_loss = token_losses(flat, None if scored_only else flat_pos, tgt, chunk_elements)
    return record_losses(token_loss, rec, batch.n_records, denominator)
