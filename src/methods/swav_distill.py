"""DisCo + SwAV (disco_pcl_evals.md A7, swav.md §3): SwAV plus the MSE between the student's
normalised embedding and a frozen SwAV teacher's projection, on all crops.

    ℓ = ℓ_SwAV + mean_{rows, dims}(s − t)² / |A|

(S-D ``main_swav_distill.py`` L435-437: ``(swav_sum + mse) / len(crops_for_assign)``, so the MSE
weight is 1/2 for A = {0, 1}.) s: the student's unit embeddings (V·B × D, with gradient); t: the
teacher's projection of the same crops, grouped by resolution like the student, **not normalised**
(the official teacher keeps ``normalize=False``), or normalised with ``normalize_teacher`` (the
corrected comparison of two unit vectors). The teacher stays in eval mode (running BN statistics),
is never trained, never in DDP and never saved; its file is checked on resume.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .disco import check_same_teacher
from .mocom import resolution_groups
from .swav import SwAV


def swav_distill_mse(student: torch.Tensor, teacher: torch.Tensor, n_assign: int) -> torch.Tensor:
    """``F.mse_loss(s, t)`` (mean over every element) / |A|: the distillation term as it enters the loss."""
    return F.mse_loss(student.float(), teacher.detach().float()) / n_assign


class SwAVDistill(SwAV):
    def __init__(self, *args, teacher: nn.Module, normalize_teacher: bool = False,
                 teacher_info: Mapping[str, Any] | None = None, **kw):
        super().__init__(*args, **kw)
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher.l2norm = normalize_teacher
        self.normalize_teacher = normalize_teacher
        self.teacher_info = dict(teacher_info or {})

    def frozen_modules(self) -> list[str]:
        return ["teacher"]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()   # official: teacher_model.eval() every epoch
        return self

    def extra_checkpoint_items(self) -> dict[str, Any]:
        return {"teacher_info": dict(self.teacher_info)}

    def state_dict_from_checkpoint(self, state_dict: dict, ckpt: dict) -> dict:
        check_same_teacher(ckpt.get("teacher_info") if isinstance(ckpt, Mapping) else None, self.teacher_info)
        return super().state_dict_from_checkpoint(state_dict, ckpt)

    @torch.no_grad()
    def teacher_embed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.teacher(torch.cat(crops[s:e])) for s, e in resolution_groups(crops)])

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
        swav, z = self.swav_loss(crops)
        t = self.teacher_embed(crops)
        with torch.autocast(device_type=z.device.type, enabled=False):
            mse = swav_distill_mse(z, t, len(self.crops_for_assign))
        return {"loss": swav + mse, "loss_swav": swav.detach(), "loss_mse": mse.detach(),
                "teacher_norm": t.float().norm(dim=1).mean().detach(),
                "queue_used": torch.tensor(float(self._use_the_queue), device=z.device)}
