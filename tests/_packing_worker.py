"""torchrun worker of tests/test_packing.py::test_two_processes_torchrun: 2 CPU processes (gloo) train
the tiny Llama for 2 optimizer steps (4 records x 3 accumulation steps per process) on the padded path,
then with token budgets of 256 and 40 tokens; global rank 0 writes {name}.pt (final weights, forward
calls of this process, global step) to the folder given as argv[1]."""

import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large.budget_trainer import TokenBudget, TokenBudgetTrainer
from tests.test_packing import ADAM_EPS, PAD, Records, pad_collate, random_records, tiny_model  # noqa: E402


def run(out: str, name: str, budget: TokenBudget | None) -> None:
    model = tiny_model("llama")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"run-{name}"), per_device_train_batch_size=4, gradient_accumulation_steps=3,
        max_steps=2, learning_rate=1e-3, optim="adamw_torch", adam_epsilon=ADAM_EPS, warmup_steps=0, weight_decay=0.0,
        seed=0, report_to=[], dataloader_num_workers=0, use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True)
    kw = dict(model=model, args=args, train_dataset=Records(random_records(48, 7)), data_collator=pad_collate)
    trainer = transformers.Trainer(**kw) if budget is None else TokenBudgetTrainer(**kw, token_budget=budget)
    trainer.train()
    uneven = False
    if budget is not None:  # every process ran as many micro-batches in every step (FSDP/ZeRO-3 need it)
        hist = [None] * 2
        torch.distributed.all_gather_object(hist, trainer.packing_stats.history)
        assert [h[2] for h in hist[0]] == [h[2] for h in hist[1]], hist
        assert all(h[0] == 3 and h[2] == max(h[1], g[1]) for h, g in zip(*hist)), hist
        uneven = any(h[1] != g[1] for h, g in zip(*hist))  # the processes planned different counts

    if trainer.is_world_process_zero():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"weights": weights, "calls": len(calls), "global_step": trainer.state.global_step,
                    "uneven": uneven},
                   os.path.join(out, f"{name}.pt"))


def main() -> None:
    transformers.logging.set_verbosity_error()
    out = sys.argv[1]
    run(out, "default", None)
    run(out, "budget256", TokenBudget(max_tokens=256, pad_token_id=PAD))
    run(out, "budget40", TokenBudget(max_tokens=40, pad_token_id=PAD))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
