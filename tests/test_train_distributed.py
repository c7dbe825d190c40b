"""ProjectedAdamW under torch.distributed DDP: 2 gloo ranks on different data hold identical
projections and weights after N steps (the gradient is all-reduced before ``step``, and random
projectors draw from seeds that are the same on every rank)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

STEPS = 5


def _worker(rank: int, world: int, init: str, tmp: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch import nn

    from rankwise.training.optim import ProjectedAdamW   # torch only: no transformers in the ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        out = {}
        for projector in ("svd", "random", "dct"):
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
            ddp = nn.parallel.DistributedDataParallel(net)
            opt = ProjectedAdamW([{"params": [net[0].bias, net[2].bias]},
                                  {"params": [net[0].weight, net[2].weight], "rank": 4, "update_proj_gap": 2,
                                   "projector": projector}], lr=1e-2)
            g = torch.Generator().manual_seed(100 + rank)            # each rank its own data
            for _ in range(STEPS):
                x, y = torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)
                opt.zero_grad()
                nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
            for name, p in net.named_parameters():
                out[f"{projector}.{name}"] = p.detach().clone()
                if "proj" in opt.state[p]:
                    out[f"{projector}.{name}.proj"] = opt.state[p]["proj"].clone()
        save_file(out, str(Path(tmp) / f"rank{rank}.safetensors"))
    except BaseException:
        dist.destroy_process_group()
        raise
    # as tests/test_distributed.py's ranks end: a barrier, destroy the group, exit without the interpreter
    # teardown (a gloo rank can abort in it, see rankwise.compression.engine.distributed.leave)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_gloo_ranks_hold_identical_projections_and_weights(tmp_path):
    from safetensors.torch import load_file

    mp.start_processes(_worker, args=(2, str(tmp_path / "pg-init"), str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and sum(k.endswith(".proj") for k in a) == 6
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    first = torch.nn.Linear(16, 24).weight
    assert not torch.equal(a["svd.0.weight"], first)   # they trained
