"""Distributed start-up for every launch style, and the collectives the methods use.

Launch styles (see README "Launching"):
- ``torchrun`` / ``python -m torch.distributed.launch``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the
  environment, one process per device, ``init_method=env://`` (or ``--dist-url`` when given);
- MoCo style ``--multiprocessing-distributed --world-size N --rank R --dist-url URL``: N nodes, this
  process spawns one worker per GPU (``--nproc`` workers on a CPU-only machine, default 1);
- SLURM (``srun``): ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``;
- a plain single process: no process group at all.

Every collective below is a no-op (identity) when no process group is initialised, so the same
method code runs in one process and in many.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------- arguments
def str2bool(v: str | bool) -> bool:
    """SwAV's ``bool_flag``: accepts true/false/on/off/1/0 (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in {"true", "on", "1", "yes", "y"}:
        return True
    if s in {"false", "off", "0", "no", "n"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {v!r} (use true/false)")


def add_dist_args(parser: argparse.ArgumentParser, *, world_size_default: int = -1,
                  rank_default: int = -1, dist_url_default: str = "env://") -> None:
    """Every spelling the official scripts accept (MoCo dashes, SwAV/CaCo underscores)."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--world-size", "--world_size", dest="world_size", type=int, default=world_size_default,
                   help="MoCo style: number of nodes (multiplied by processes per node); torchrun sets it (-1: from the environment)")
    g.add_argument("--rank", type=int, default=rank_default, help="MoCo style: node rank (-1: from the launcher's environment)")
    g.add_argument("--dist-url", "--dist_url", dest="dist_url", default=dist_url_default,
                   help="init_method of the process group")
    g.add_argument("--dist-backend", "--dist_backend", dest="dist_backend", default=None,
                   help="nccl on GPU, gloo on CPU (None: chosen from the device)")
    g.add_argument("--multiprocessing-distributed", "--multiprocessing_distributed",
                   dest="multiprocessing_distributed", nargs="?", const=True, default=False, type=str2bool,
                   help="spawn one process per GPU on this node (CaCo passes it as an int)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch (both spellings accepted; None: not launched by it)")
    g.add_argument("--gpu", type=int, default=None, help="GPU id for a single-GPU run (None: chosen by the launcher)")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes per node for --multiprocessing-distributed "
                        "(None: number of GPUs, or 1 on a CPU-only machine)")


# ----------------------------------------------------------------------------- launch
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (single-node rendezvous; the tests' launchers use it too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_device(local_rank: int, gpu: int | None) -> torch.device:
    if torch.cuda.is_available():
        idx = gpu if gpu is not None else local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _init_group(info: DistInfo, url: str, backend: str | None) -> None:
    backend = backend or ("nccl" if info.device.type == "cuda" else "gloo")
    if backend == "nccl" and info.device.type != "cuda":
        backend = "gloo"
    kwargs = {}
    if info.device.type == "cuda" and backend == "nccl":
        kwargs["device_id"] = info.device
    env = os.environ
    if url == "env://" and "TORCHELASTIC_RESTART_COUNT" in env and "MASTER_ADDR" in env:
        # an elastic restart re-forms the group on the store of the previous attempt, whose stale gloo
        # addresses a new rank can read before they are rewritten ("connectFullMesh ... Connection
        # refused"): keys under a per-attempt prefix
        agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), info.world_size,
                              is_master=info.rank == 0 and not agent, timeout=datetime.timedelta(minutes=30))
        store = dist.PrefixStore(f"ssl_attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend=backend, store=store, world_size=info.world_size, rank=info.rank, **kwargs)
        return
    dist.init_process_group(backend=backend, init_method=url, world_size=info.world_size,
                            rank=info.rank, **kwargs)


def _spawn_worker(local_rank: int, fn: Callable, args, nproc: int, node_rank: int, nodes: int,
                  url: str) -> None:
    info = DistInfo(rank=node_rank * nproc + local_rank, world_size=nodes * nproc,
                    local_rank=local_rank, local_world_size=nproc)
    info.device = _pick_device(local_rank, None)
    if info.world_size > 1:
        _init_group(info, url, args.dist_backend)
    try:
        fn(info, args)
    except UserError as e:  # one clear line from the worker, then a non-zero exit of the whole run
        print(f"error: {e}" if info.rank == 0 else f"error: [rank {info.rank}] {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup()


def launch(fn: Callable[[DistInfo, argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Start ``fn(info, args)`` in every process of the run, whatever the launch style."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        info = DistInfo(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                        local_rank=int(env.get("LOCAL_RANK", args.local_rank or 0)),
                        local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
        info.device = _pick_device(info.local_rank, None)
        url = args.dist_url if args.dist_url not in (None, "") and not _is_unreachable_default(args.dist_url) \
            else "env://"
        if "MASTER_ADDR" in env:  # the launcher's rendezvous always wins over a copied --dist-url
            url = "env://"
        if info.world_size > 1:
            _init_group(info, url, args.dist_backend)
        try:
            fn(info, args)
        finally:
            cleanup()
        return
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and not args.multiprocessing_distributed:
        info = DistInfo(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                        local_rank=int(env.get("SLURM_LOCALID", 0)),
                        local_world_size=slurm_tasks_per_node(env))
        info.device = _pick_device(info.local_rank, None)
        url = "env://" if "MASTER_ADDR" in env else args.dist_url
        if url == "env://" or _is_unreachable_default(url):
            if "MASTER_ADDR" not in env:
                raise UserError("SLURM launch: set MASTER_ADDR/MASTER_PORT or pass --dist-url tcp://<first node>:<port>")
            url = "env://"
        _init_group(info, url, args.dist_backend)
        try:
            fn(info, args)
        finally:
            cleanup()
        return
    if args.multiprocessing_distributed:
        nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
        nodes = max(args.world_size, 1)
        node_rank = max(args.rank, 0)
        url = args.dist_url
        if int(env.get("SLURM_NTASKS", "1")) > 1:  # srun with one task per node: nodes and node rank from SLURM
            nodes, node_rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
            if "MASTER_ADDR" in env:
                url = "env://"
        if nodes == 1 and (url in (None, "", "env://") or _is_unreachable_default(url)):
            url = f"tcp://127.0.0.1:{free_port()}"
        if nodes * nproc == 1:
            info = DistInfo(device=_pick_device(0, args.gpu))
            fn(info, args)
            return
        try:
            mp.spawn(_spawn_worker, nprocs=nproc, args=(fn, args, nproc, node_rank, nodes, url))
        except mp.ProcessExitedException as e:
            raise SystemExit(e.exit_code or 1) from None
        return
    info = DistInfo(device=_pick_device(0, args.gpu))
    fn(info, args)


def slurm_tasks_per_node(env) -> int:
    """Tasks on this node: ``SLURM_NTASKS_PER_NODE`` when ``--ntasks-per-node`` was given, else
    the first entry of the always-present ``SLURM_TASKS_PER_NODE`` (``8(x2)`` or ``8,4``)."""
    v = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    return int(v.split(",")[0].split("(")[0])


def _is_unreachable_default(url: str) -> bool:
    # The official MoCo/SogCLR/CaCo default (a multicast address) can never rendezvous.
    return "224.66.41.62" in str(url)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- helpers
def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(t, src)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


@torch.no_grad()
def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order (MoCo's
    ``concat_all_gather``). No gradient flows through it."""
    if not is_dist():
        return t.detach()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def gather_variable(t: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs between ranks (evaluation features)."""
    if not is_dist():
        return t.detach()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = [torch.empty((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    dist.all_gather(buf, torch.cat([t, pad], 0).contiguous())
    return torch.cat([b[:s] for b, s in zip(buf, sizes)], 0)


class _GatherWithGrad(torch.autograd.Function):
    """Differentiable all_gather. Backward with ``full=True``: the gradient of every rank's loss
    is summed (all-reduce) and this rank's slice returned, i.e. the exact gradient of the global
    objective. ``full=False``: only this rank's slice of its own incoming gradient (the official
    SogCLR ``all_gather_layer``): what other ranks' anchors put on this rank's features is dropped."""

    @staticmethod
    def forward(ctx, x, full: bool):
        ctx.full = full
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        if not ctx.full:
            return grads[dist.get_rank()].contiguous(), None
        g = torch.stack(grads).contiguous()
        dist.all_reduce(g)
        return g[dist.get_rank()], None


def gather_with_grad(t: torch.Tensor, full_grad: bool = True) -> torch.Tensor:
    """Differentiable all_gather (rank order). ``full_grad=False`` is the official SogCLR variant."""
    if not is_dist():
        return t
    return torch.cat(_GatherWithGrad.apply(t, full_grad), 0)


# ----------------------------------------------------------------------------- agreement and state sync
@functools.lru_cache(maxsize=1)
def cpu_group():
    """A gloo process group over all ranks for small host-side collectives (stop requests, resume
    decisions) that must not wait for the GPU stream. The default group when it is gloo already.
    Created on first use: every rank must reach the first call at the same point."""
    if not is_dist():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a host-side all-reduce MAX)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (host side)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cpu_group())
    return box[0]


def agree(ok: bool, message: str = "") -> None:
    """Collective check: when ``ok`` is False on any rank, every rank raises the same
    :class:`UserError`, naming the first failing rank and its ``message``."""
    if not is_dist():
        if not ok:
            raise UserError(message)
        return
    if not any_rank(not ok):
        return
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if ok else message, group=cpu_group())
    rank, msg = next((r, m) for r, m in enumerate(msgs) if m is not None)
    raise UserError(f"[rank {rank}] {msg}")


@torch.no_grad()
def sync_bn_stats_(module: torch.nn.Module) -> int:
    """Average the BatchNorm running mean/var of ``module`` over all ranks (in place), so that
    evaluation-mode features (kNN monitor, PCL's E-step) are the same on every rank. Only BN
    statistics are touched: queues, ``u``, memories and frozen teachers are left alone.
    Returns the number of BN layers synchronised."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns or not is_dist():
        return len(bns)
    flat = torch.cat([torch.cat([m.running_mean.float().flatten(), m.running_var.float().flatten()]) for m in bns])
    all_reduce_mean_(flat)
    off = 0
    for m in bns:
        n = m.running_mean.numel()
        m.running_mean.copy_(flat[off:off + n].view_as(m.running_mean))
        m.running_var.copy_(flat[off + n:off + 2 * n].view_as(m.running_var))
        off += 2 * n
    return len(bns)


@torch.no_grad()
def state_checksum(tensors) -> torch.Tensor:
    """A float64 checksum of floating tensors (position-weighted sums), for cross-rank equality checks."""
    acc = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.numel():
            v = t.detach().double().flatten().cpu()
            acc[0] += v.sum()
            acc[1] += (v * (1.0 + (i % 97))).abs().sum()
    return acc


def same_on_all_ranks(tensors) -> bool:
    """True on every rank when the checksum of ``tensors`` is identical on all ranks."""
    if not is_dist():
        return True
    c = state_checksum(tensors)
    lo, hi = c.clone(), c.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=cpu_group())
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(torch.equal(lo, hi))
