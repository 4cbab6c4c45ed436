"""Token-budget micro-batches in training (--max_tokens_per_micro_batch): the records of one
optimizer step regrouped into as few packed micro-batches as fit in the budget, with the same gradient.

Loss normalisation (transformers 5.23, trainer.py): Trainer._get_num_items_in_batch counts the label
tokens of the step's micro-batches (labels[..., 1:] != -100 for a causal LM), summed over processes
(accelerator.gather) when average_tokens_across_devices (default True). With a model that accepts loss
kwargs, compute_loss passes num_items_in_batch to the model, whose ForCausalLMLoss returns
sum(token losses) / num_items_in_batch, and multiplies it by the number of processes (DDP averages the
gradients); training_step does not divide by the accumulation steps (loss_is_scaled_for_ga). The loss
of a step is therefore a sum over its tokens with one common denominator, and any regrouping of the
step's records gives the same gradient up to float rounding: TokenBudgetTrainerMixin keeps the very
num_items_in_batch the default path computed. Without loss kwargs (num_items_in_batch None) the default
loss is the mean of each padded micro-batch divided by the number of micro-batches; the packed path
then weights every token by 1 / (label tokens of its ORIGINAL micro-batch) and returns the sum, which
training_step divides by the same count: again the default's loss exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

from small2large.attention import (
    FLASH,
    TORCH_VARLEN,
    implementation_of,
    is_varlen,
    resolve_attn_implementation,
)
from small2large.packing import (
    TOKEN_WEIGHT_KEY,
    batch_records,
    pack_rows,
    packed_attention_work,
    plan_micro_batches,
    split_plan,
)
from utils import IGNORE_INDEX, UserError


@dataclass(frozen=True)
class TokenBudget:
    """The --max_tokens_per_micro_batch setting. max_tokens: tokens of a packed micro-batch (rows x
    row length); varlen: the attention runs varlen kernels (one row per micro-batch, no cap);
    max_row_tokens: cap of a row otherwise (None: the step's longest record; either way lowered until the
    rows' dense attention work is within the padded path's for the step); pad_to_multiple_of: row
    length rounding (e.g. 128 for flex_attention, whose compiled kernel is specialised per length)."""

    max_tokens: int
    pad_token_id: int
    varlen: bool = False
    max_row_tokens: int | None = None
    pad_to_multiple_of: int = 1

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"--max_tokens_per_micro_batch must be a positive number of tokens, got {self.max_tokens}")
        if self.max_row_tokens is not None and self.max_row_tokens < 1:
            raise UserError(f"--max_row_tokens must be a positive number of tokens, got {self.max_row_tokens}")
        if self.pad_to_multiple_of < 1:
            raise UserError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.pad_token_id is None:
            raise UserError("token-budget micro-batches need a pad token id")

    @classmethod
    def for_model(cls, model, max_tokens: int, pad_token_id: int, max_row_tokens: int | None = None,
                  pad_to_multiple_of: int = 1) -> TokenBudget:
        """The budget for ``model``: varlen when its attention implementation is a varlen one; an
        implementation that cannot take packed rows is a UserError (resolve_attn_implementation)."""
        impl = implementation_of(model) or "eager"
        device = next((p.device for p in model.parameters()), None)
        if impl not in (TORCH_VARLEN, *FLASH):  # those were checked when the model was loaded
            resolve_attn_implementation(impl, packing=True, device=device)
        return cls(max_tokens, pad_token_id, is_varlen(impl), max_row_tokens, pad_to_multiple_of)


class PackedStep(list):
    """One item of a step's micro-batch list as the Trainer loop sees it: a list (often empty) of
    packed micro-batches (model input dicts) that training_step runs one after the other."""

    real_tokens: int = 0
    padded_tokens: int = 0


@dataclass
class PackingStats:
    steps: int = 0
    default_micro_batches: int = 0  # micro-batches of the padded path (what the dataloader gave)
    micro_batches: int = 0  # packed micro-batches run (forward + backward)
    records: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0  # tokens run through the model, row padding included
    default_padded_tokens: int = 0  # tokens of the padded path's micro-batches
    attention_work: int = 0  # packed_attention_work of the packed micro-batches
    default_attention_work: int = 0  # of the padded path's micro-batches (dense)
    # per step: (padded micro-batches, packed ones planned here, packed ones run: the most any process planned)
    history: list = field(default_factory=list)


class TokenBudgetTrainerMixin:
    """Trainer mixin: with ``token_budget`` (a TokenBudget; None: the default path) the records of each
    optimizer step are regrouped into as few packed micro-batches as fit the budget.

    The hook is get_batch_samples (trainer.py, _run_epoch calls it once per optimizer step with
    num_batches = gradient_accumulation_steps, fewer for an epoch's last step): super() pulls the step's
    padded micro-batches from the dataloader exactly as the default path does (same sampler, seed,
    records per process, resumption skip) and computes num_items_in_batch; the records are then
    regrouped (plan_micro_batches) and returned with the SAME num_items_in_batch, as a list of the SAME
    length: the loop's per-item step counter drives do_sync_step, the epoch fraction, callbacks and
    current_gradient_accumulation_steps, so steps per epoch, LR schedule and logging are unchanged.
    The last item (a PackedStep) carries all packed micro-batches and the others are empty:
    training_step runs them in order, the extra ones under no_sync (as the loop does for its
    non-final items) with sync_gradients False (DeepSpeed's accumulation boundary), the last one as the
    loop's final micro-batch (gradient all-reduce, then clipping and the optimizer step). Under
    torch.distributed every process runs as many micro-batches (an all-reduce of the count; split_plan)
    so FSDP/ZeRO-3 collectives pair. See the module docstring for the loss normalisation.

    Works with the project's padded collator (records recovered through the attention mask) or a
    one-row packed one (position ids). Not with DataParallel (n_gpu > 1) nor tensor/context/sequence
    parallelism. FLOPs and tokens seen (include_num_input_tokens_seen) count the packed rows."""

    def __init__(self, *args, token_budget: TokenBudget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.packing_stats = PackingStats()
        self._forward_takes_kwargs: bool | None = None

    # -- regrouping ------------------------------------------------------------------

    def _token_budget_checks(self) -> None:
        if self.args.n_gpu > 1:
            raise UserError("token-budget micro-batches do not work with DataParallel (n_gpu > 1): launch one "
                            "process per GPU (torchrun)")
        sizes = {name: getattr(self, f"get_{name}_size", lambda: 1)() for name in ("tp", "cp", "sp")}
        if any(v > 1 for v in sizes.values()):
            raise UserError(f"token-budget micro-batches do not work with tensor/context/sequence parallelism ({sizes})")

    def _token_budget_loss_mode(self, num_items_in_batch) -> str:
        if num_items_in_batch is not None and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return "num_items"
        if self.label_smoother is None and self.compute_loss_func is None:
            return "weighted"
        raise UserError("token-budget micro-batches with label smoothing or a custom loss need a model whose "
                        "loss takes num_items_in_batch")

    def _agreed_micro_batches(self, count: int) -> int:
        dist = torch.distributed
        if self.args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        budget = self.token_budget
        if budget is None or not batch_samples:
            return batch_samples, num_items_in_batch
        self._token_budget_checks()
        mode = self._token_budget_loss_mode(num_items_in_batch)
        records: list[tuple[torch.Tensor, torch.Tensor]] = []
        weights: list[float] = []
        stats = self.packing_stats
        step_work = 0  # the padded path's dense attention work for these records: packed rows stay within it
        for mb in batch_samples:
            if "shift_labels" in mb:
                raise UserError("token-budget micro-batches: batches with shift_labels are not supported")
            recs = batch_records(mb)
            records += recs
            stats.default_padded_tokens += mb["input_ids"].numel()
            step_work += packed_attention_work([[int(r[0].shape[0])] for r in recs], varlen=False)
            if mode == "weighted":  # the default loss: mean over the micro-batch's shifted labels
                n = int((mb["labels"][..., 1:] != IGNORE_INDEX).sum())
                weights += [1.0 / n if n else 0.0] * len(recs)
        lengths = [int(ids.shape[0]) for ids, _ in records]
        plan = plan_micro_batches(lengths, budget.max_tokens, budget.max_row_tokens, budget.varlen,
                                  max_attention_work=step_work)
        planned = len(plan)
        plan = split_plan(plan, self._agreed_micro_batches(planned))
        where = records[0][0].device if records else device
        packed = [pack_rows(records, mb, budget.pad_token_id, budget.pad_to_multiple_of,
                            record_weights=weights if mode == "weighted" else None, device=where) for mb in plan]
        step = PackedStep(p.model_inputs(budget.varlen) for p in packed)
        step.real_tokens = sum(p.real_tokens for p in packed)
        step.padded_tokens = sum(p.padded_tokens for p in packed)
        stats.steps += 1
        stats.default_attention_work += step_work
        stats.default_micro_batches += len(batch_samples)
        stats.records += len(records)
        stats.real_tokens += step.real_tokens
        stats.padded_tokens += step.padded_tokens
        stats.attention_work += sum(packed_attention_work([[lengths[i] for i in r] for r in mb], budget.varlen)
                                    for mb in plan)
        stats.history.append((len(batch_samples), planned, len(packed)))
        items = [PackedStep() for _ in range(len(batch_samples) - 1)]
        return [*items, step], num_items_in_batch

    # -- running ---------------------------------------------------------------------

    def _token_budget_no_sync(self, model):
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.gradient_state.plugin_kwargs.get("sync_each_batch", False) or \
                acc.distributed_type == DistributedType.DEEPSPEED:
            return contextlib.nullcontext()
        if getattr(self, "is_distributed_loading_by_transformers", False):
            from transformers.distributed.fsdp import is_fsdp_managed_module

            if is_fsdp_managed_module(self.model):
                return self._defer_fsdp_gradient_reduction()
        return acc.no_sync(model=model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not isinstance(inputs, PackedStep):
            return super().training_step(model, inputs, num_items_in_batch)
        total = torch.zeros((), device=self.args.device)
        state = self.accelerator.gradient_state
        sync = state.sync_gradients
        try:
            for k, mb in enumerate(inputs):
                final = k == len(inputs) - 1
                state._set_sync_gradients(sync if final else False)
                ctx = self._token_budget_no_sync(model) if sync and not final else contextlib.nullcontext()
                with ctx:
                    total = total + super().training_step(model, mb, num_items_in_batch)
                self.packing_stats.micro_batches += 1
        finally:
            state._set_sync_gradients(sync)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = inputs.pop(TOKEN_WEIGHT_KEY, None) if isinstance(inputs, dict) else None
        if weight is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.pop("labels")
        if self._forward_takes_kwargs is None:  # decided once: inspect.signature is no per-micro-batch work
            self._forward_takes_kwargs = _takes_var_kwargs(self.accelerator.unwrap_model(model))
        if not self._forward_takes_kwargs:  # a forward without **kwargs
            for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                inputs.pop(key, None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        ce = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")
        loss = (ce * weight[:, 1:][keep].to(ce.device)).sum()
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs):
        if isinstance(inputs, PackedStep):
            return sum(super(TokenBudgetTrainerMixin, self).floating_point_ops(mb) for mb in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        if not isinstance(inputs, PackedStep):
            return super()._track_num_input_tokens(inputs)
        mode = self.args.include_num_input_tokens_seen
        if mode in ("no", False, None):
            return
        n = inputs.real_tokens if mode == "non_padding" else inputs.padded_tokens
        t = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(t).sum().item()


def _takes_var_kwargs(model) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


class TokenBudgetTrainer(TokenBudgetTrainerMixin, transformers.Trainer):
    """transformers.Trainer with token-budget micro-batches (``token_budget=TokenBudget(...)``)."""
