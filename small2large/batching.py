"""Batches of tokenized records: the Trainer's dataset and collator (the paper's right-padded batch,
or one packed row with --padding_free), and the scoring engine's length-sorted, token-budget batches
and their split over processes.

    >>> length_sorted_batches([3, 1, 2, 5], max_tokens=6)   # longest first, batch x longest <= 6
    [[3], [0, 2], [1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from small2large.rendering import SupervisedData
from utils import IGNORE_INDEX


class SupervisedDataset:
    """torch-style map dataset over SupervisedData: item i -> {"input_ids", "labels"} (int64 tensors)."""

    def __init__(self, data: SupervisedData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {
            "input_ids": torch.tensor(self.data.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.data.labels[i], dtype=torch.long),
        }


def pad_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int):
    """Right-pad a batch of records: input_ids with the pad id, labels with IGNORE_INDEX; the attention
    mask comes from the true lengths (not from ``input_ids != pad``, which breaks when pad == eos).
    Returns (input_ids, labels, attention_mask) int64 tensors of shape [batch, longest].

    >>> ids, lab, att = pad_batch([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), lab.tolist(), att.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """
    import torch

    n = max(len(x) for x in input_ids)
    b = len(input_ids)
    ids = torch.full((b, n), pad_token_id, dtype=torch.long)
    lab = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((b, n), dtype=torch.long)
    for j, (x, y) in enumerate(zip(input_ids, labels)):
        k = len(x)
        ids[j, :k] = torch.as_tensor(x)
        lab[j, :k] = torch.as_tensor(y)
        att[j, :k] = 1
    return ids, lab, att


def pack_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]):
    """Pack a batch of records into one row, in order, without padding (transformers'
    DataCollatorWithFlattening): position ids restart at 0 for every record, from which transformers
    builds a block-diagonal causal mask (sdpa, eager) or variable-length flash-attention calls, and the
    first label of every record is IGNORE_INDEX, so that no record's last token is trained to predict the
    next record's first one. A causal LM never predicts position 0 of a padded row either, so the loss
    over the packed row equals the loss over the padded batch. Returns (input_ids, labels, position_ids)
    int64 tensors of shape [1, total tokens].

    >>> ids, lab, pos = pack_batch([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    >>> ids.tolist(), lab.tolist(), pos.tolist()
    ([[5, 6, 7, 8, 9]], [[-100, 6, 7, -100, 9]], [[0, 1, 2, 0, 1]])
    """
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    b = flat([{"input_ids": x, "labels": y} for x, y in zip(input_ids, labels)], return_tensors="pt")
    return b["input_ids"], b["labels"], b["position_ids"]


@dataclass
class DataCollatorForSupervisedDataset:
    """The Trainer's collator over a list of SupervisedDataset items: utils.pad_batch (the paper's
    right-padded batch), or with ``padding_free`` utils.pack_batch (the same records in the same order,
    packed into one row). ``use_cache=False`` goes with a packed batch: with a cache (the default of
    most configs) transformers does not look for packing in the position ids and lets records attend
    to each other."""

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, instances: Sequence[dict]) -> dict:
        ids = [x["input_ids"] for x in instances]
        labels = [x["labels"] for x in instances]
        if self.padding_free:
            ids, lab, pos = pack_batch(ids, labels)
            return {"input_ids": ids, "labels": lab, "position_ids": pos, "use_cache": False}
        ids, lab, att = pad_batch(ids, labels, self.pad_token_id)
        return {"input_ids": ids, "labels": lab, "attention_mask": att}


def length_sorted_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group record indices into batches whose padded size (records x longest) is <= max_tokens,
    after sorting by length, longest first (ties by index, so the result is deterministic).
    A record longer than the budget gets a batch of its own.

        >>> length_sorted_batches([3, 10, 4, 9, 3], max_tokens=20)
        [[1, 3], [2, 0, 4]]
        >>> length_sorted_batches([30, 5], max_tokens=20)
        [[0], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def shard_batches(n_batches: int, rank: int, world_size: int) -> list[int]:
    """Batch numbers scored by ``rank``: a strided share (rank, rank + world_size, ...) which balances
    the work of length-sorted batches (score_pplxs keeps the processes in lockstep when shares differ).

        >>> shard_batches(5, 0, 2), shard_batches(5, 1, 2)
        ([0, 2, 4], [1, 3])
    """
    return list(range(rank, n_batches, world_size))


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(processed tokens incl. padding, real tokens) of right-padded batches.

        >>> padding_share([3, 10, 4], [[1, 2], [0]])
        (23, 17)
    """
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return processed, sum(lengths[i] for b in batches for i in b)


def _collate(input_ids, labels, idx, pad_token_id, device):
    ids, lab, att = pad_batch([input_ids[i] for i in idx], [labels[i] for i in idx], pad_token_id)
    return ids.to(device), lab.to(device), att.to(device)
