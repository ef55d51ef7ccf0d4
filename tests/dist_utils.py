"""Run a function in N gloo processes (CPU) and collect what each rank returns."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
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


# ----------------------------------------------------------------------------- entry scripts under a launcher
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.launch --nproc_per_node=N script args`` (the seeds' launcher)."""
    return [sys.executable, "-m", "torch.distributed.launch", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", script, *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    r = subprocess.run(launch_cmd(script, args, nproc), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def worker_pids(launcher_pid: int, script: str) -> dict[int, int]:
    """rank → pid of the launcher's worker processes running ``script`` (read from /proc)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        kids = [int(c) for c in f.read().split()]
    out = {}
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if script.encode() not in f.read():
                    continue
            with open(f"/proc/{k}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            out[int(env[b"RANK"])] = k
        except (FileNotFoundError, KeyError, ValueError):
            pass
    return out


def launch_and_signal(script: str, args: list[str], log_jsonl: str, when, sig: int = signal.SIGUSR1,
                      rank: int = 0, nproc: int = 2) -> str:
    """Launch ``script`` on ``nproc`` processes and send ``sig`` (a real signal, as SLURM sends it) to the
    worker of ``rank`` as soon as a row of ``log_jsonl`` satisfies ``when(row)``; returns the output
    (the run must exit 0: the stop is clean). Fails if the condition never showed."""
    p = subprocess.Popen(launch_cmd(script, args, nproc), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0, sent = time.time(), False
    while p.poll() is None and time.time() - t0 < 300 and not sent:
        if os.path.isfile(log_jsonl):
            rows = [json.loads(x) for x in open(log_jsonl).read().splitlines() if x.strip().endswith("}")]
            if any(when(r) for r in rows):
                os.kill(worker_pids(p.pid, script)[rank], sig)
                sent = True
        time.sleep(0.005)
    out = p.communicate(timeout=300)[0]
    assert sent, "the signal was never sent:\n" + out[-3000:]
    assert p.returncode == 0, out[-3000:]
    return out
