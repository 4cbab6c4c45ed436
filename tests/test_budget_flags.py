"""train.py / dump_pplxs.py with --max_tokens_per_micro_batch and --attn_implementation: the scripts train
through budget_trainer.TokenBudgetTrainer with fewer forward/backward passes and the same weights and
dumps as the paper's padded micro-batches; a kernel that is missing or cannot run is a one-line error."""

import pytest
import transformers

import dump_pplxs
import train
from small2large import budget_trainer, finetune
from tests._dump_pplxs_helpers import max_rel_diff, one_thread_fixture
from utils import UserError, run_cli, safe_load_pickle

_one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _argv(model, data, out, *extra):
    # 12 records, 2 per micro-batch x 3 accumulation steps: 2 optimizer steps of 3 micro-batches per epoch
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--learning_rate", "1e-2",
            "--adam_epsilon", "1e-6", "--model_max_length", "256", "--seed", "42", "--report_to", "none",
            "--disable_tqdm", "True", "--save_strategy", "no", "--attn_implementation", "sdpa", *extra]


class _FirstGradients(transformers.TrainerCallback):
    """Keeps every parameter's gradient at the first optimizer step (accumulated over the step)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fit(argv) -> tuple:
    grads = _FirstGradients()
    trainer = finetune.fit(*train.parse_args(argv), prepare=lambda tr, data, tok: tr.add_callback(grads))
    return trainer, grads.grads


def test_train_with_a_token_budget_runs_fewer_passes_and_gives_the_same_gradients(tiny_llama, tiny_dataset, tmp_path):
    padded, g_padded = _fit(_argv(tiny_llama, tiny_dataset, tmp_path / "padded", "--num_train_epochs", "1"))
    packed, g_packed = _fit(_argv(tiny_llama, tiny_dataset, tmp_path / "packed", "--num_train_epochs", "1",
                                  "--max_tokens_per_micro_batch", "4096"))
    assert type(padded) is not budget_trainer.TokenBudgetTrainer
    assert isinstance(packed, budget_trainer.TokenBudgetTrainer)
    stats = packed.packing_stats
    assert stats.steps == 2 and stats.default_micro_batches == 6 and stats.micro_batches == 2, stats
    assert padded.state.global_step == packed.state.global_step == 2
    assert g_padded.keys() == g_packed.keys() and len(g_padded) > 10
    for name, g in g_padded.items():   # the step's gradient, float32, relative to its largest entry
        assert float(g.abs().max()) > 0, name
        assert float((g_packed[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
    # and the weights after the two steps (Adam), relative to each tensor's largest weight
    for (name, p), q in zip(packed.model.named_parameters(), padded.model.parameters()):
        assert float((p - q).abs().max()) <= 1e-4 * float(q.abs().max()), name


def test_dumps_with_a_token_budget_equal_the_padded_paths(tiny_llama, tiny_dataset, tmp_path):
    dumps = {}
    for name, extra in (("padded", ()), ("packed", ("--max_tokens_per_micro_batch", "300"))):
        dump_pplxs.main(_argv(tiny_llama, tiny_dataset, tmp_path / name / "out", "--num_train_epochs", "2",
                              "--dump_dir", str(tmp_path / name / "dumps"), *extra))
        dumps[name] = {e: safe_load_pickle(str(tmp_path / name / "dumps" / f"epoch-{e}.pkl")) for e in ("pre", 1, 2)}
    assert dumps["packed"]["pre"] == dumps["padded"]["pre"]   # the same untrained model, the same scoring
    for e in (1, 2):
        assert dumps["packed"][e] != dumps["padded"]["pre"]      # training moved them
        assert max_rel_diff(dumps["packed"][e], dumps["padded"][e]) < 1e-4, e


@pytest.mark.parametrize("impl, message", [
    ("flash_attention_2", "needs a CUDA device"),  # no GPU here (and flash-attn is not installed)
    ("torch_varlen", "CUDA"),                  # torch's varlen kernel runs on CUDA only
])
def test_a_kernel_that_cannot_run_is_a_one_line_error(tiny_llama, tiny_dataset, tmp_path, capsys, impl, message):
    argv = _argv(tiny_llama, tiny_dataset, tmp_path / "out", "--max_tokens_per_micro_batch", "512")
    argv[argv.index("sdpa")] = impl
    assert run_cli(train.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    with pytest.raises(UserError, match=message):
        finetune.setup(*train.parse_args(argv))


def test_budget_and_padding_free_together_are_a_usage_error(tiny_llama, tiny_dataset, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.parse_args(_argv(tiny_llama, tiny_dataset, tmp_path, "--max_tokens_per_micro_batch", "512",
                               "--padding_free", "True"))
    assert e.value.code == 2
