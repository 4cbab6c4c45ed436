"""Worker of tests/test_fsdp2.py, run by torchrun on 2 CPU processes (gloo): shards a tiny Llama with
FSDP2 (torch.distributed.fsdp.fully_shard; accelerate enables FSDP only on GPUs, so the test shards
the model itself), scores it with dump_pplxs.score_pplxs and through PerplexityDumpCallback.dump()
with a Trainer holding the sharded model, counting the root forward calls of each process.
Writes {out}/rank{R}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp2_worker.py MODEL_DIR DATA.json OUT_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large import epoch_dumps, scoring  # noqa: E402


def main(model_dir, data_path, out):
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import dump_pplxs
    from small2large.record_io import load_records
    from small2large.rendering import SupervisedData, tokenize_records
    from tests._dump_pplxs_helpers import load

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    model, tok = load(model_dir)
    data = SupervisedData(*tokenize_records(load_records(data_path), tok, 256))
    mesh = init_device_mesh("cpu", (ws,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, FSDPModule)
    shard = next(model.parameters())
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    pplxs, stats = scoring.score_pplxs(model, data, tok.pad_token_id, max_tokens=700, rank=rank,
                                          world_size=ws, progress=False)
    engine_calls = calls[0]

    args = transformers.TrainingArguments(output_dir=os.path.join(out, "trainer"), use_cpu=True, report_to="none")
    trainer = transformers.Trainer(model=model, args=args)
    cb = epoch_dumps.PerplexityDumpCallback(data, tok.pad_token_id, dump_pplxs.DumpArguments(
        dump_dir=os.path.join(out, "dumps"), pplx_max_tokens=700)).attach(trainer)
    calls[0] = 0
    cb.dump("pre")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": ws, "engine_pplxs": pplxs, "engine_batches": stats.n_batches,
                   "engine_calls": engine_calls, "callback_calls": calls[0],
                   "callback_batches": getattr(cb, "last_stats", None) and cb.last_stats.n_batches, "written": cb.written,
                   "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
                   "sharded": type(shard).__name__, "local_shard_numel": shard.to_local().numel(),
                   "full_numel": shard.numel()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
