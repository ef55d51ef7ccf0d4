"""DisCo: MoCo v2 student distilled from a frozen teacher (disco_pcl_evals.md A2, A3, A6, D1).

Notation (A3): views x1 (query) and x2 (key); n(·) = L2 normalisation; f_q the student's query
encoder, f_k its momentum encoder, f_t the teacher; all heads end in 128-d.

    s1 = n(f_q(x1)), s2 = n(f_q(x2))              (student query encoder on BOTH views, with grad)
    t1 = n(f_t(x1)), t2 = n(f_t(x2)), k2 = n(f_k(x2))   (no grad; shuffle-BN for f_k)
    L  = CE([s1·k2, s1·Queue] / τ, 0) + w · (D(t1, s1) + D(t2, s2))

with D the squared error summed over the per-process batch and the 128 dims (the official
``nn.MSELoss(reduction='sum')``; ``reduction="mean"`` divides by the batch size instead). ``--only-mse``
drops the InfoNCE term (weight 0, the queue still advances). ``distill="rkd"`` (A6) replaces the
distillation by RKD's distance + angle terms on the query view, ``use_mse`` adds D back (RKD+DisCo).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..errors import UserError
from ..models.backbones import build_encoder, feat_dim
from ..models.heads import moco_head
from ..models.momentum import make_momentum_copy, momentum_update_, shuffle_bn_forward
from ..models.queue import advance_, enqueue_, init_queue
from .base import ContrastiveMethod, topk_accuracy
from .moco import moco_loss

TEACHER_ATTR = "teacher_encoder_q"   # the official module name: checkpoints stay compatible


# ----------------------------------------------------------------------------- losses
def distill_mse(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Σ_i ||t_i − s_i||² over the N rows and all dims (``sum``, official: ``nn.MSELoss(reduction='sum')``),
    or (1/N) Σ_i ||t_i − s_i||² (``mean``: per-sample mean, NOT ``F.mse_loss``'s per-element mean).
    The teacher side carries no gradient."""
    se = (teacher.detach() - student).pow(2).sum()
    if reduction == "sum":
        return se
    if reduction == "mean":
        return se / student.shape[0]
    raise ValueError(f"unknown distillation reduction {reduction!r} (sum or mean)")


def disco_distill_loss(s1: torch.Tensor, t1: torch.Tensor, s2: torch.Tensor, t2: torch.Tensor,
                       reduction: str = "sum", weight: float = 1.0) -> torch.Tensor:
    """DisCo's distillation (A3): w · (D(t1, s1) + D(t2, s2)), the same view matched on both views."""
    return weight * (distill_mse(s1, t1, reduction) + distill_mse(s2, t2, reduction))


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKD's ``pdist``: d_ij = sqrt(max(||e_i||² + ||e_j||² − 2 e_i·e_j, eps)), d_ii = 0."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(e.shape[0], device=e.device, dtype=d.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D (A6): SmoothL1(β=1) between d^s/μ_s and d^t/μ_t, the N×N pairwise distances divided by
    the mean of their strictly positive entries, averaged over all N² entries (diagonal included)."""
    with torch.no_grad():
        td = pairwise_distances(teacher)
        td = td / td[td > 0].mean()
    sd = pairwise_distances(student)
    sd = sd / sd[sd > 0].mean()
    return F.smooth_l1_loss(sd, td, reduction="mean")


def _angles(e: torch.Tensor) -> torch.Tensor:
    """a[i, j, k] = cos∠(e_j − e_i, e_k − e_i), with zero difference vectors left at zero."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A (A6): SmoothL1(β=1) between the student's and the teacher's angle tensors, mean over N³."""
    with torch.no_grad():
        ta = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), ta, reduction="mean")


# ----------------------------------------------------------------------------- module
class DisCo(ContrastiveMethod):
    """MoCo v2 student (``encoder_q``, ``encoder_k``, ``queue``, ``queue_ptr``) + a frozen teacher in
    ``teacher_encoder_q`` (no gradient, not in the optimiser, not in checkpoints by default).

    ``teacher_bn``: ``"train"`` (official: the teacher follows ``model.train()``, its BatchNorms use
    the statistics of each process's batch and keep updating their running stats) or ``"eval"``
    (running statistics, never updated). In a single process with ``groups`` > 1 the teacher runs in
    ``groups`` chunks in train mode, so its BN statistics are those of the official per-GPU batches
    (as shuffle-BN's emulation does for the key encoder)."""

    def __init__(self, arch: str, teacher: nn.Module, teacher_arch: str, dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.07, mlp: bool = True, hidden: int = 2048, distill: str = "mse",
                 use_mse: bool = False, only_mse: bool = False, reduction: str = "sum", weight: float = 1.0,
                 teacher_bn: str = "train", shuffle_groups: int = 1, cifar_stem: bool = False,
                 teacher_info: Mapping[str, Any] | None = None):
        super().__init__()
        if distill not in ("mse", "rkd"):
            raise UserError(f"--distill {distill!r}: choose mse (DisCo) or rkd")
        if teacher_bn not in ("train", "eval"):
            raise UserError(f"--teacher_bn {teacher_bn!r}: choose train (official) or eval")
        if reduction not in ("sum", "mean"):
            raise UserError(f"--distill_reduction {reduction!r}: choose sum (official) or mean")
        self.arch, self.teacher_arch, self.K, self.m, self.T = arch, teacher_arch, K, m, T
        self.distill, self.use_mse, self.only_mse = distill, use_mse, only_mse
        self.reduction, self.weight, self.teacher_bn, self.shuffle_groups = reduction, weight, teacher_bn, shuffle_groups
        self.teacher_info = dict(teacher_info or {})
        # A2: with --mlp the student head is Linear(F, 2048) → ReLU → Linear(2048, dim) whatever the arch
        self.encoder_q = build_encoder(arch, moco_head(feat_dim(arch), dim, mlp, hidden), cifar_stem=cifar_stem)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        setattr(self, TEACHER_ATTR, teacher.requires_grad_(False))
        self.register_buffer("queue", init_queue(dim, K))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def teacher(self) -> nn.Module:
        return getattr(self, TEACHER_ATTR)

    # -------------------------------------------------------------- engine hooks
    def frozen_modules(self) -> list[str]:
        return [TEACHER_ATTR]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_bn == "eval":
            self.teacher.eval()
        return self

    def extra_checkpoint_items(self) -> dict[str, Any]:
        """Which teacher the run distils from (path, arch, sha256): resume refuses a changed file."""
        return {"teacher_info": dict(self.teacher_info)}

    def state_dict_from_checkpoint(self, state_dict: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
        """Check the teacher of the checkpoint; drop the official checkpoints' unused
        ``teacher_encoder_k.*`` copy. A saved ``teacher_encoder_q.*`` (``--save_teacher`` or an
        official checkpoint) is loaded back (its BN running statistics included)."""
        check_same_teacher(ckpt.get("teacher_info") if isinstance(ckpt, Mapping) else None, self.teacher_info)
        return {k: v for k, v in state_dict.items() if not k.startswith("teacher_encoder_k.")}

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def _teacher_embed(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.shuffle_groups if (self.teacher.training and not D.is_dist()) else 1
        if groups > 1 and x.shape[0] % groups == 0:
            out = torch.cat([self.teacher(c) for c in x.chunk(groups)])
        else:
            out = self.teacher(x)
        return F.normalize(out.float(), dim=1)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = D.gather_no_grad(keys)
        enqueue_(self.queue, keys, self.queue_ptr)
        advance_(self.queue_ptr, keys.shape[0], self.K)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
        x1, x2 = crops[0], crops[1]
        s1 = F.normalize(self.encoder_q(x1), dim=1)
        s2 = F.normalize(self.encoder_q(x2), dim=1)
        with torch.no_grad():  # official order: EMA, teacher(x2), shuffled key encoder(x2), teacher(x1)
            momentum_update_(self.encoder_k, self.encoder_q, self.m)
            t2 = self._teacher_embed(x2)
            k2 = F.normalize(shuffle_bn_forward(self.encoder_k, x2, self.shuffle_groups), dim=1).float()
            t1 = self._teacher_embed(x1)
        s1, s2 = s1.float(), s2.float()
        l_moco, logits = moco_loss(s1, k2, self.queue.clone().detach(), self.T)
        self._dequeue_and_enqueue(k2)
        out: dict[str, torch.Tensor] = {"loss_moco": l_moco.detach()}
        mse = disco_distill_loss(s1, t1, s2, t2, self.reduction, self.weight)
        out["loss_distill"] = mse.detach()
        if self.distill == "mse":
            loss = mse if self.only_mse else l_moco + mse
        else:  # RKD baseline (A6): query view only, weights 1 and 1
            l_d, l_a = rkd_distance_loss(s1, t1), rkd_angle_loss(s1, t1)
            out["loss_rkd_dist"], out["loss_rkd_angle"] = l_d.detach(), l_a.detach()
            loss = l_moco + l_d + l_a + (mse if self.use_mse else 0.0)
        out["loss"] = loss
        out["acc1"], out["acc5"] = topk_accuracy(logits, torch.zeros(logits.shape[0], dtype=torch.long,
                                                                     device=logits.device))
        return out


def check_same_teacher(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Resume refuses a teacher whose arch or file content differs from the one the checkpoint
    was trained with (checkpoints without ``teacher_info``, e.g. official ones, are not checked)."""
    if not saved or not current:
        return
    if saved.get("arch") and current.get("arch") and saved["arch"] != current["arch"]:
        raise UserError(f"the checkpoint was trained with --teacher_arch {saved['arch']}, not {current['arch']}")
    if saved.get("sha256") and current.get("sha256") and saved["sha256"] != current["sha256"]:
        raise UserError(f"the teacher file changed since the checkpoint was written: it was {saved.get('path')} "
                        f"(sha256 {saved['sha256'][:12]}…), --teacher {current.get('path')} has sha256 "
                        f"{current['sha256'][:12]}…; resume with the original teacher or use another --output_dir")
