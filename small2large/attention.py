"""Attention implementations for packed rows (--attn_implementation): which ones can take packed
records, one-line errors for those that cannot or are not installed, and "torch_varlen", torch's own
varlen flash kernel registered with transformers.

What transformers 5.23 does with a packed row (position ids restart, no 2D attention mask, no cache):
  * sdpa / eager: masking_utils.create_causal_mask finds the documents from the position ids
    (find_packed_sequence_indices) and builds a DENSE [rows, 1, T, T] boolean (eager: float) mask:
    attention costs T^2 per row whatever the documents, and the mask memory grows as T^2.
  * flex_attention: the same document mask as a BlockMask (create_block_mask): blocks outside every
    document are skipped; torch.compile'd (tens of seconds on a CPU the first time).
  * flash_attention_2/3/4 and hub flash kernels: varlen kernels; cu_seqlens come from the position ids
    (one row only: _is_packed_sequence needs batch size 1) or from cu_seq_lens_q/k, max_length_q/k
    passed as model kwargs (any shape; this module passes them, so no host sync per layer).
  * torch 2.13 ships torch.nn.attention.varlen.varlen_attn (aten._flash_attention_forward: its own
    flash kernel, CUDA, fp16/bf16, GQA, with backward); transformers 5.23 has no attention implementation
    using it. This module registers
    one, "torch_varlen" (register_torch_varlen), so a GPU without flash-attn installed still gets varlen
    attention; nothing is built from source.
  * packing is detected ONLY when attention_mask is None and there is no cache (use_cache=False): a 2D
    attention mask switches the document mask off and lets records attend to each other. So rows of
    different lengths in one micro-batch are right-padded with a dummy "record" of pad tokens (position
    ids 0, 1, ...; labels IGNORE_INDEX) which, under the document mask, attends only to itself.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
import transformers

from utils import UserError

TORCH_VARLEN = "torch_varlen"  # the attention implementation registered by register_torch_varlen


DENSE_MASK = ("eager", "sdpa")  # packed rows get a dense [rows, 1, T, T] mask


BLOCK_MASK = ("flex_attention",)  # packed rows get a BlockMask (document mask, empty blocks skipped)


FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")  # varlen kernels


def _is_hub_kernel(name: str) -> bool:
    from transformers.integrations.hub_kernels import is_kernel

    return is_kernel(name)


def is_varlen(impl: str | None) -> bool:
    """Whether ``impl`` runs packed rows with a variable-length kernel (each record attends only to
    itself, no mask tensor): flash_attention_2/3/4, a hub flash kernel, or torch_varlen.

    >>> is_varlen("flash_attention_2"), is_varlen("torch_varlen"), is_varlen("sdpa"), is_varlen("flex_attention")
    (True, True, False, False)
    """
    if not impl:
        return False
    return impl in FLASH or impl == TORCH_VARLEN or (_is_hub_kernel(impl) and "flash" in impl.lower())


def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_attn_implementation(name: str | None, packing: bool, device=None) -> str:
    """The attention implementation to load the model with, checked: ``name`` is what the user asked
    (None or "auto": the best installed one), ``packing`` whether rows hold several records, ``device``
    where the model runs (default: cuda if available). Raises a one-line UserError for one that is not
    installed or cannot run here, or cannot take packed rows. "auto" with packing on CUDA:
    flash_attention_2 if flash-attn is installed, else torch_varlen (registered here), else sdpa; on a
    CPU, or without packing: sdpa. torch_varlen is registered with transformers when returned.

    >>> resolve_attn_implementation("auto", packing=True, device="cpu")
    'sdpa'
    >>> resolve_attn_implementation("flex_attention", packing=True, device="cpu")
    'flex_attention'
    """
    from transformers.utils import is_kernels_available, is_torch_flex_attn_available

    name = (name or "auto").strip()
    cuda = _device_type(device) == "cuda"
    if name == "auto":
        if packing and cuda:
            if transformers.utils.is_flash_attn_2_available():
                return "flash_attention_2"
            if _has_torch_varlen():
                return register_torch_varlen()
        return "sdpa"
    if name in DENSE_MASK:
        return name
    if name in BLOCK_MASK:
        if not is_torch_flex_attn_available():
            raise UserError(f"attention {name}: this torch ({torch.__version__}) has no usable FlexAttention; "
                            "use sdpa")
        return name
    if name.startswith("flash_attention_"):
        version = name.removeprefix("flash_attention_")
        if name not in FLASH:
            raise UserError(f"attention {name}: unknown flash attention version (flash_attention_2, _3 or _4)")
        if not cuda:
            raise UserError(f"attention {name} needs a CUDA device; on this machine use sdpa")
        installed = getattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: False)()
        if not installed and not is_kernels_available():
            package = {"2": "flash-attn", "3": "flash-attn-3", "4": "flash-attn-4"}[version]
            raise UserError(f"attention {name}: the {package} package is not installed (nor `kernels`, "
                            f"for the hub build); use {TORCH_VARLEN} (torch's own varlen kernel) or sdpa")
        return name  # without flash-attn transformers loads the hub kernel (kernels-community/...)
    if name == TORCH_VARLEN:
        if not _has_torch_varlen():
            raise UserError(f"attention {name}: this torch ({torch.__version__}) has no "
                            "torch.nn.attention.varlen (torch 2.13 has); use sdpa")
        if not cuda:
            raise UserError(f"attention {name} runs torch's flash kernel, on CUDA only; on this machine use sdpa")
        return register_torch_varlen()
    if name.startswith("paged|"):
        raise UserError(f"attention {name}: paged attention is for generation, not training or scoring")
    if _is_hub_kernel(name):
        if not is_kernels_available():
            raise UserError(f"attention {name}: a hub kernel needs the kernels package (pip install kernels)")
        if packing and "flash" not in name.lower():
            raise UserError(f"attention {name}: packed rows need a varlen (flash) kernel or a mask-based "
                            "implementation (sdpa, eager, flex_attention)")
        return name
    raise UserError(f"unknown attention implementation {name!r}: eager, sdpa, flex_attention, "
                    f"flash_attention_2/3/4, {TORCH_VARLEN}, a hub kernel 'org/repo', or auto")


_varlen_kernel = None  # torch.nn.attention.varlen.varlen_attn, looked up on first use (tests substitute)


def _kernel():
    global _varlen_kernel
    if _varlen_kernel is None:
        from torch.nn.attention.varlen import varlen_attn

        _varlen_kernel = varlen_attn
    return _varlen_kernel


@functools.lru_cache(maxsize=8)
def _kernel_params(kernel) -> frozenset:
    """The parameter names of a varlen kernel (read once per kernel, not at every attention call)."""
    import inspect

    return frozenset(inspect.signature(kernel).parameters)


def unwrap_model(model):
    """The transformers model inside DDP / FSDP1 / DeepSpeed / torch.compile / peft wrappers."""
    for _ in range(4):  # DDP / FSDP1 / DeepSpeed / compiled wrappers keep the real model in .module / ._orig_mod
        model = getattr(model, "module", getattr(model, "_orig_mod", model))
        if hasattr(model, "get_base_model"):  # peft (LoRA): the adapted model, LoRA layers injected in place
            model = model.get_base_model()
    return model


def implementation_of(model) -> str | None:
    """The attention implementation a (possibly wrapped) transformers model runs, or None."""
    return getattr(getattr(unwrap_model(model), "config", None), "_attn_implementation", None)


def _kernel_call(q, k, v, scaling, window, causal: bool):
    """(q, k, v, keyword arguments) for the installed torch's varlen_attn, by the parameters it has:
    torch 2.13 takes scale, window_size and enable_gqa; 2.11 scale and window_size (no grouped-query
    attention: the key/value heads are repeated); 2.10 is_causal only (no scale or sliding window:
    refused). A kernel that shows none of window_size / is_causal is refused rather than run non-causal."""
    params = _kernel_params(_kernel())
    hq, hk = q.shape[1], k.shape[1]
    call = {}
    if "window_size" in params:
        call["window_size"] = window
    elif "is_causal" in params and window in ((-1, 0), (-1, -1)):
        call["is_causal"] = causal
    else:
        raise ValueError(f"{TORCH_VARLEN} attention: this torch's varlen_attn takes neither window_size nor "
                         "is_causal (or not this sliding window); use sdpa")
    if "scale" in params:
        call["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6 * scaling:
        raise ValueError(f"{TORCH_VARLEN} attention: this torch's varlen_attn has no scale argument; use sdpa")
    if "enable_gqa" in params:
        call["enable_gqa"] = hq != hk
    elif hq != hk:  # grouped-query attention by repeating the key/value heads
        k, v = (x.repeat_interleave(hq // hk, dim=1) for x in (k, v))
    return q, k, v, call


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def torch_varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None,
                                   sliding_window: int | None = None, softcap: float | None = None,
                                   cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                   position_ids=None, **kwargs):
    """A transformers attention function (AttentionInterface) over torch.nn.attention.varlen.varlen_attn.
    query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None). The documents come from, in
    order: a 2D padding mask (padded batches: the real tokens of each row), cu_seq_lens_q/k and
    max_length_q/k (packed micro-batches of this module: no host sync), the position ids (a document
    starts where they are 0), or each row whole. float32 inputs under autocast are cast to its dtype."""
    if dropout:
        raise ValueError(f"{TORCH_VARLEN} attention has no dropout: set the config's attention_dropout to 0")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{TORCH_VARLEN} attention supports neither logit softcapping nor attention sinks")
    b, hq, t, d = query.shape
    if key.shape[2] != t:
        raise ValueError(f"{TORCH_VARLEN} attention is for training and scoring: no key/value cache")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = (-1, 0) if causal else (-1, -1)
    if sliding_window:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    dtype = query.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    if query.is_cuda and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{TORCH_VARLEN} attention runs in fp16/bf16 only (got {dtype}): use bf16 autocast "
                         "(--bf16) or a bf16 model, or sdpa")
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d).to(dtype) for x in (query, key, value))
    q, k, v, call = _kernel_call(q, k, v, scaling, window, causal)
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"{TORCH_VARLEN} attention takes a 2D padding mask, not a {attention_mask.ndim}D one")
        mask = attention_mask.bool()
        idx = mask.reshape(-1).nonzero().squeeze(1)
        lens = mask.sum(1, dtype=torch.int32)
        cu, mx = _cu_seqlens(lens), int(lens.max())
        out = torch.zeros_like(q)
        out[idx] = _kernel()(q[idx], k[idx], v[idx], cu, cu, mx, mx, **call)
    else:
        if cu_seq_lens_q is None:
            if position_ids is not None:
                starts = position_ids.expand(b, t) == 0
                starts[:, 0] = True
                first = starts.reshape(-1).nonzero().squeeze(1).to(torch.int32)
            else:
                first = torch.arange(0, b * t, t, dtype=torch.int32, device=q.device)
            cu_seq_lens_q = torch.cat([first, first.new_tensor([b * t])])
            max_length_q = int(cu_seq_lens_q.diff().max())
        if cu_seq_lens_k is None:
            cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
        out = _kernel()(q, k, v, cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k), **call)
    return out.view(b, t, hq, d), None


def register_torch_varlen() -> str:
    """Register "torch_varlen" with transformers (attention function and mask function: a 2D padding
    mask or None, as for flash attention), so that ``attn_implementation="torch_varlen"`` and
    ``model.set_attn_implementation("torch_varlen")`` work. Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention_forward)
    AttentionMaskInterface.register(TORCH_VARLEN, flash_attention_mask)
    return TORCH_VARLEN
