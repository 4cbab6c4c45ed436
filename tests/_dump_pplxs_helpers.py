"""Helpers for the dump_pplxs tests: load a tiny model like a hub model (independently of
train.py) and an independent one-record-at-a-time float32 perplexity reference."""

import math
import socket

import torch

IGNORE = -100


def load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from small2large.models import add_missing_special_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    add_missing_special_tokens(tok, model)
    model.eval()
    return model, tok


@torch.no_grad()
def reference_pplxs(model, input_ids, labels, denominator="nonzero"):
    """One record at a time, no padding, full forward, manual float32 log-softmax."""
    out = []
    for ids, lab in zip(input_ids, labels):
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        losses = [-float(logp[t, lab[t + 1]]) for t in range(len(ids) - 1) if lab[t + 1] != IGNORE]
        den = len(losses) if denominator == "mean" else sum(1 for x in losses if x != 0.0)
        out.append(math.exp(sum(losses) / den) if den else 1.0)
    return out


def max_rel_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def one_thread_fixture():
    """An autouse fixture body for the tiny-model tests: one torch thread. With 2 threads on 2 shared,
    busy cores a tiny model's matmuls wait on each other (measured 30x slower); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> str:
    """A free TCP port on 127.0.0.1 (for torchrun's --master_port / rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
