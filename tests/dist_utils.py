"""Run a function in N gloo processes (CPU) and collect what each rank returns."""
from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.distributed import free_port


def _worker(rank, world_size, port, fn, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=rank)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except Exception:  # noqa: BLE001
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args):
    """``fn(rank, world_size, *args)`` must be a module-level function (picklable); its return
    values (tensors, dicts, lists) come back as a list indexed by rank."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, d), nprocs=world_size, join=True)
        res = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world_size)]
    for r, x in enumerate(res):
        if not x["ok"]:
            raise AssertionError(f"rank {r} failed:\n{x['error']}")
    return [x["result"] for x in res]
