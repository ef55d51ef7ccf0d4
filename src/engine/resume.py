"""Training checkpoints: where and when they are written, what they hold, and how a run resumes.

Resume is decided once, by rank 0 (``--resume``, else the newest of the policy's checkpoint and an
interrupted one), and broadcast; every rank then loads that same file and checks that it sees the
same epoch and iteration, or every rank stops with one line (an output directory that is not shared
between nodes). After loading, the weights are compared across ranks.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .. import distributed as D
from ..checkpoint import latest_checkpoint, link_or_copy, load_checkpoint, save_atomic
from ..errors import UserError
from ..models.backbones import canonical_arch
from ..zoo import resolve
from .rng import rng_state, set_rng_state

log = logging.getLogger("ssl")


@dataclass
class CheckpointPolicy:
    """Where and when checkpoints are written. ``filename(epoch)`` names the file for the (0-based)
    epoch just finished; ``copies(epoch, epochs)`` lists extra paths to hard-link it to;
    ``should_save(epoch, epochs)`` decides whether to write at all (the last epoch always is).
    Auto-resume looks for ``fixed_resume_name`` (e.g. LORAC's ``checkpoint.pth.tar``), else for the
    highest ``checkpoint_NNNN.pth.tar``, and for ``interrupted_name``."""
    directory: str
    filename: Callable[[int], str] = lambda e: f"checkpoint_{e:04d}.pth.tar"
    should_save: Callable[[int, int], bool] = lambda e, n: True
    copies: Callable[[int, int], list[str]] = lambda e, n: []
    fixed_resume_name: str | None = None
    #: written when a run is stopped by SIGUSR1/SIGTERM before its epoch's regular checkpoint
    interrupted_name: str = "checkpoint_interrupted.pth.tar"

    def latest(self) -> str | None:
        if self.fixed_resume_name:
            p = os.path.join(self.directory, self.fixed_resume_name)
            return p if os.path.isfile(p) else None
        return latest_checkpoint(self.directory)

    def candidates(self) -> tuple[list[str], list[str]]:
        """Auto-resume's files: (primary, fallback). Primary: the newest / fixed-name checkpoint and the
        interrupted one; fallback, newest first: older ``checkpoint_NNNN`` files and the ``checkpoints/``
        copies, read only when a primary one cannot be."""
        primary = [p for p in (self.latest(), os.path.join(self.directory, self.interrupted_name))
                   if p and os.path.isfile(p)]
        rx = re.compile(r"(checkpoint(_\d+)?\.pth\.tar|checkpoint_interrupted\.pth\.tar|ckp-\d+\.pth)")
        older = []
        for d in (self.directory, os.path.join(self.directory, "checkpoints")):
            if os.path.isdir(d):
                older += [os.path.join(d, f) for f in os.listdir(d) if rx.fullmatch(f)]
        older = sorted((p for p in older if p not in primary), key=os.path.getmtime, reverse=True)
        return primary, older

    def write(self, state: dict, epoch: int, epochs: int) -> str:
        """Rank 0: the epoch's checkpoint and its copies; removes a superseded interrupted one."""
        path = os.path.join(self.directory, self.filename(epoch))
        save_atomic(state, path)
        for c in self.copies(epoch, epochs):
            os.makedirs(os.path.dirname(c), exist_ok=True)
            link_or_copy(path, c)
        stale = os.path.join(self.directory, self.interrupted_name)
        if os.path.exists(stale):
            os.unlink(stale)
        return path


@dataclass
class ResumePlan:
    """What rank 0 decided to resume: the file and the position it holds."""
    path: str
    epoch: int                  # epoch to run next (the interrupted one when ``iter`` > 0)
    iter: int                   # iterations of ``epoch`` already done (0: start of the epoch)
    world_size: int | None      # of the run that wrote it (None: an older or official checkpoint)
    batch_size: int | None      # per process, likewise
    extra: dict = field(default_factory=dict)
    source: str | None = None   # the URL / zoo name ``path`` was downloaded from (other nodes fetch it too)


def _position(ckpt: Any) -> tuple[int, int]:
    if isinstance(ckpt, dict) and "epoch" in ckpt:
        return int(ckpt["epoch"]), int(ckpt.get("iter", 0))
    return -1, 0


def _plan(path: str, ckpt: Any) -> ResumePlan:
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint of this repository (no state_dict/optimizer)")
    e, i = _position(ckpt)
    ws, bs = ckpt.get("world_size"), ckpt.get("batch_size")
    return ResumePlan(os.path.abspath(path), e, i, None if ws is None else int(ws), None if bs is None else int(bs))


def decide_on_rank0(policy: CheckpointPolicy, resume: str | None, auto_resume: bool) -> tuple[ResumePlan | None, Any]:
    """Rank 0 only: (plan, the loaded checkpoint) or (None, None). Each candidate is read once."""
    if resume or not auto_resume:
        if not resume:
            return None, None
        local = resolve(resume, "--resume checkpoint")  # a URL or zoo name: downloaded by rank 0 only
        ck = load_checkpoint(local)
        plan = _plan(local, ck)
        plan.source = resume if local != resume else None
        return plan, ck
    primary, older = policy.candidates()
    loaded, skipped = [], []
    for i, p in enumerate(primary + older):
        if i >= len(primary) and loaded:   # older files are only a fallback for unreadable primary ones
            break
        try:
            ck = load_checkpoint(p)
            _position(ck)
        except (UserError, KeyError, TypeError, ValueError) as e:
            skipped.append(p)
            log.warning("auto-resume: skipping %s, which cannot be read (%s)", p, str(e).split(": ", 1)[-1][:160])
            continue
        loaded.append((p, ck))
    if not loaded:
        if skipped:
            raise UserError(f"auto-resume: no readable checkpoint in {policy.directory} ({len(skipped)} unreadable: "
                            f"{', '.join(os.path.basename(p) for p in skipped)}); move them away to start from scratch")
        return None, None
    path, ck = max(loaded, key=lambda pc: _position(pc[1]))
    if skipped:
        log.warning("auto-resume: resuming from %s, the newest readable checkpoint", path)
    return _plan(path, ck), ck


def decide(policy: CheckpointPolicy, resume: str | None, auto_resume: bool) -> tuple[ResumePlan | None, Any]:
    """Collective: rank 0 decides and broadcasts; every rank returns the same plan and its own copy
    of the checkpoint (read from the same path), or every rank raises the same one-line error."""
    plan, ck, err = None, None, None
    if D.get_rank() == 0:
        try:
            plan, ck = decide_on_rank0(policy, resume, auto_resume)
        except UserError as e:
            err = str(e)
    plan, err = D.broadcast_object((plan, err))
    if err:
        raise UserError(err)
    if plan is None:
        return plan, ck
    msg = ""
    try:  # rank 0 already holds its copy, but joins the collective check below like every rank
        if D.get_rank() != 0:
            if not os.path.isfile(plan.path) and plan.source:  # a node without the cache rank 0 used
                plan = replace(plan, path=os.path.abspath(resolve(plan.source, "--resume checkpoint")))
            if not os.path.isfile(plan.path):
                raise UserError(f"cannot see {plan.path}, the checkpoint rank 0 resumes from: the output "
                                "directory must be shared by all nodes (or give every node a copy and --resume)")
            ck = load_checkpoint(plan.path)
            if _position(ck) != (plan.epoch, plan.iter):
                raise UserError(f"{plan.path} holds epoch {_position(ck)[0]} iteration {_position(ck)[1]} here "
                                f"but epoch {plan.epoch} iteration {plan.iter} on rank 0: the output directory "
                                "differs between nodes")
    except UserError as e:
        msg = str(e)
    D.agree(not msg, msg)
    return plan, ck


def training_state(method, optimizer, scaler, *, epoch: int, next_iter: int, arch: str, method_name: str,
                   args: dict, world_size: int, batch_size: int, save_frozen: bool = False) -> dict[str, Any]:
    """``epoch`` is the next epoch to run (official meaning); ``iter`` > 0 only in a checkpoint
    written in the middle of an epoch (then ``epoch`` is the interrupted one). Frozen modules (a
    DisCo teacher) are left out unless ``save_frozen``."""
    sd = method.state_dict()
    if not save_frozen:
        sd = {k: v for k, v in sd.items() if not method.is_frozen_key(k)}
    return {"epoch": epoch if next_iter else epoch + 1, "iter": next_iter, "arch": arch, "method": method_name,
            "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(), "args": args,
            "world_size": world_size, "batch_size": batch_size, **method.extra_checkpoint_items()}


def restore(plan: ResumePlan, ckpt: dict, method, optimizer, scaler, *, arch: str, method_name: str) -> None:
    """Load ``ckpt`` into the method, optimiser, scaler and RNG (strict, frozen modules excepted),
    then check that the weights are identical on every rank."""
    path = plan.path
    msg = ""
    try:
        wrote = ckpt.get("method", method_name), ckpt.get("arch", arch)
        if wrote[0] != method_name or canonical_arch(wrote[1]) != canonical_arch(arch):
            raise UserError(f"{path} was written by {wrote[0]} / {wrote[1]}, not {method_name} / {arch}: "
                            "use another --output_dir or --resume")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
        try:
            sd = method.state_dict_from_checkpoint(sd, ckpt)
            missing, unexpected = method.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not method.is_frozen_key(k)]
            if missing or unexpected:
                raise RuntimeError(f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from e
    except UserError as e:
        msg = str(e)
    D.agree(not msg, msg)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    if not D.same_on_all_ranks(list(method.state_dict().values())):
        raise UserError(f"after resuming from {path} the weights differ between ranks: the checkpoint "
                        "files differ between nodes")
