"""SwAV (swav.md §1-2): multi-crop swapped prediction of Sinkhorn-Knopp codes over L2-normalised
prototypes, with the per-rank embedding queue and prototype freezing of the official code.

Notation (§2.4): V = Σ ``nmb_crops`` crops of B samples, rows crop-major; z the unit embeddings
(V·B × D), c the prototypes (K × D, unit rows); scores s = z cᵀ. For every assignment crop
a ∈ A = ``crops_for_assign`` the code q_a = SK(s_a) (with the queue's re-scored embeddings in front,
only the batch's last B rows kept) predicts every other crop:

    ℓ = (1/|A|) Σ_a (1/(V−1)) Σ_{v≠a} mean_b[ −Σ_k q_{a,bk} log softmax(s_v / τ)_{bk} ]

State-dict names are those of the official model (``conv1.weight``, ``projection_head.0.weight``,
``prototypes.weight``; saved with ``module.``), plus the ``queue`` buffer: (W, |A|, L, D), every
rank's queue, kept identical on all ranks so that rank 0's checkpoint resumes every rank exactly.
Each rank scores and shifts only its own slot ``queue[rank]`` (the official queue is local).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..errors import UserError
from ..models.backbones import arch_spec, build_encoder, convert_sync_batchnorm, sync_bn_plan
from ..models.swav_resnet import swav_projection_head
from .base import ContrastiveMethod, Headless
from .mocom import resolution_groups

log = logging.getLogger("ssl")


# ----------------------------------------------------------------------------- pure functions
@torch.no_grad()
def distributed_sinkhorn(out: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp of S ``main_swav.py`` (§2.3) on the N_loc × K scores of this process, in fp32.

    Q = exp(out/ε)ᵀ (K × N_loc, no max-subtraction); B = N_loc · W (all processes, queues included);
    Q /= ΣQ (all-reduced); ``iterations`` times: Q /= all-reduced row sums, Q /= K, then
    Q /= local column sums, Q /= B; finally Q ·= B so every column sums to 1. Returns Qᵀ (N_loc × K)."""
    with torch.autocast(device_type=out.device.type, enabled=False):
        Q = torch.exp(out.float() / epsilon).t()
        K, B = Q.shape[0], Q.shape[1] * D.get_world_size()
        Q /= D.all_reduce_sum_(Q.sum())
        for _ in range(iterations):
            Q /= D.all_reduce_sum_(Q.sum(dim=1, keepdim=True))
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()


def swapped_prediction_loss(scores: torch.Tensor, codes: Sequence[torch.Tensor], crops_for_assign: Sequence[int],
                            temperature: float) -> torch.Tensor:
    """ℓ of the module docstring. ``scores`` (V, B, K); ``codes[i]`` (B, K) is the code of crop
    ``crops_for_assign[i]``. Computed in fp32."""
    V = scores.shape[0]
    logp = F.log_softmax(scores.float() / temperature, dim=-1)      # (V, B, K)
    loss = scores.new_zeros((), dtype=torch.float32)
    for q, a in zip(codes, crops_for_assign):
        others = [v for v in range(V) if v != a]
        ce = -(q.float().unsqueeze(0) * logp[others]).sum(-1).mean(-1)  # (V-1,) mean over the batch
        loss = loss + ce.sum() / (V - 1)
    return loss / len(crops_for_assign)


def swav_head(in_dim: int, hidden_mlp: int, feat_dim: int) -> nn.Module:
    """S ``resnet50.py``: Linear(F, out) when ``hidden_mlp`` is 0, else Linear → BN1d → ReLU → Linear."""
    if hidden_mlp == 0:
        return nn.Linear(in_dim, feat_dim)
    return swav_projection_head(in_dim, hidden_mlp, feat_dim)


def trimmed_queue_length(queue_length: int, batch_size: int, world_size: int) -> int:
    """S L207: ``queue_length -= queue_length % (batch_size · W)`` (3840 → 3584 on 8 × 64)."""
    return queue_length - queue_length % (batch_size * world_size)


def check_crops_for_assign(crops_for_assign: Sequence[int], n_crops: int) -> None:
    bad = [c for c in crops_for_assign if not 0 <= c < n_crops]
    if bad or not crops_for_assign or len(set(crops_for_assign)) != len(crops_for_assign):
        raise UserError(f"--crops_for_assign {list(crops_for_assign)}: give distinct crop indices in [0, {n_crops - 1}] "
                        f"(sum of --nmb_crops is {n_crops})")
    if n_crops < 2:
        raise UserError("SwAV needs at least 2 crops (sum of --nmb_crops)")


# ----------------------------------------------------------------------------- module
class SwAV(ContrastiveMethod):
    """Backbone (registered under the official names) → projection head → L2 norm → prototypes.

    ``queue_length`` is the *global* length, already trimmed (each rank keeps queue_length / W);
    the queue is switched on at the start of 0-based epoch ``epoch_queue_starts`` and used once its
    last row is filled (§2.2). Prototype gradients are dropped for global steps < ``freeze_prototypes_niters``."""

    def __init__(self, arch: str, nmb_crops: Sequence[int], crops_for_assign: Sequence[int] = (0, 1),
                 hidden_mlp: int = 2048, feat_dim: int = 128, nmb_prototypes: int = 3000, temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3, queue_length: int = 0,
                 epoch_queue_starts: int = 15, freeze_prototypes_niters: int = 313, world_size: int = 1,
                 cifar_stem: bool = False):
        super().__init__()
        self.nmb_crops, self.crops_for_assign = list(nmb_crops), list(crops_for_assign)
        check_crops_for_assign(self.crops_for_assign, sum(self.nmb_crops))
        if feat_dim <= 0 or nmb_prototypes <= 0:
            raise UserError("--feat_dim and --nmb_prototypes must be positive for SwAV training")
        if queue_length % world_size:
            raise UserError(f"--queue_length {queue_length} is not divisible by the {world_size} processes")
        self.arch, self.temperature, self.epsilon = arch, temperature, epsilon
        self.sinkhorn_iterations, self.epoch_queue_starts = sinkhorn_iterations, epoch_queue_starts
        self.freeze_prototypes_niters, self.world_size = freeze_prototypes_niters, world_size
        self.queue_length = queue_length   # global (each rank keeps queue_length / world_size)
        spec = arch_spec(arch)
        self._adopt(build_encoder(arch, None, cifar_stem=cifar_stem))
        self.projection_head = swav_head(spec.feat_dim, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, nmb_prototypes, bias=False)
        if spec.family == "timm":
            # D efficientnet_init_weights (§1.4): every Linear, head and prototypes included, U(±1/√out), bias 0
            for m in [*self.projection_head.modules(), self.prototypes]:
                if isinstance(m, nn.Linear):
                    nn.init.uniform_(m.weight, -1 / math.sqrt(m.out_features), 1 / math.sqrt(m.out_features))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self.register_buffer("queue", torch.zeros(world_size, len(self.crops_for_assign),
                                                  queue_length // world_size, feat_dim))
        self.queue_active = False   # set per epoch from epoch_queue_starts
        self._use_the_queue = False  # the official per-epoch flag (re-armed as soon as the queue is full)

    # -------------------------------------------------------------- structure
    def _adopt(self, encoder: nn.Module) -> None:
        """Register the encoder's layers on this module (official names, no ``encoder_q.``); the
        encoder object itself (head = identity) runs them and is kept unregistered."""
        object.__setattr__(self, "_encoder", encoder)
        head = arch_spec(self.arch).head_attr
        for name, child in encoder.named_children():
            if name != head:
                setattr(self, name, child)

    def convert_sync_bn(self, mode: str, group_size: int, device: torch.device) -> str:
        """``--sync_bn pytorch|apex``: SyncBatchNorm for the whole model, head BN1d included (§2.6)."""
        convert, group, what = sync_bn_plan(mode, group_size, device)
        if not convert:
            return what
        self._adopt(convert_sync_batchnorm(self._encoder, process_group=group))
        self.projection_head = convert_sync_batchnorm(self.projection_head, process_group=group)
        return what

    def backbone(self) -> nn.Module:
        return Headless(self._encoder, self.arch)

    # -------------------------------------------------------------- engine hooks
    def on_epoch_start(self, epoch: int, ctx=None) -> None:
        active = self.queue.shape[2] > 0 and epoch >= self.epoch_queue_starts
        if active and not self.queue_active:
            log.info("epoch %d: queue of %d embeddings per process and assignment crop", epoch, self.queue.shape[2])
        self.queue_active, self._use_the_queue = active, False

    def before_optimizer_step(self, step) -> None:
        if step.global_step < self.freeze_prototypes_niters:
            for p in self.prototypes.parameters():
                p.grad = None

    def state_dict_from_checkpoint(self, state_dict: dict, ckpt: dict) -> dict:
        q = state_dict.get("queue")
        if q is None:  # an official checkpoint: its queues live in queue{rank}.pth
            log.warning("the checkpoint holds no queue: starting with an empty one")
            state_dict = {**state_dict, "queue": torch.zeros_like(self.queue)}
        elif tuple(q.shape) != tuple(self.queue.shape):
            raise UserError(f"the checkpoint's queue has shape {tuple(q.shape)} (processes, crops, length, dim), this "
                            f"run needs {tuple(self.queue.shape)}: resume with the same processes, --batch_size, "
                            "--queue_length and --crops_for_assign")
        return state_dict

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """§2.1 step 2: unit rows, in place, before every forward."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.data.clone(), dim=1, p=2))

    def embed(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, scores): the backbone once per resolution group, the head once over all V·B rows (§1.3)."""
        feats = [self._encoder(torch.cat(crops[s:e])) for s, e in resolution_groups(crops)]
        z = F.normalize(self.projection_head(torch.cat(feats)).float(), dim=1, p=2)
        return z, self.prototypes(z)

    @torch.no_grad()
    def assign(self, z: torch.Tensor, scores: torch.Tensor, B: int) -> list[torch.Tensor]:
        """The codes of the assignment crops, with the queue (scored with the current prototypes,
        then shifted by this batch's embeddings, §2.2)."""
        r = D.get_rank() if self.world_size > 1 else 0
        codes = []
        for i, a in enumerate(self.crops_for_assign):
            out = scores[a * B:(a + 1) * B].detach()
            if self.queue_active and (self._use_the_queue or bool(self.queue[r, i, -1].any())):
                self._use_the_queue = True
                out = torch.cat([self.queue[r, i].to(out.dtype) @ self.prototypes.weight.t().to(out.dtype), out])
            codes.append(distributed_sinkhorn(out, self.epsilon, self.sinkhorn_iterations)[-B:])
        if self.queue_active:
            new = torch.stack([z[a * B:(a + 1) * B] for a in self.crops_for_assign]).detach()  # (|A|, B, D)
            new = D.gather_no_grad(new.unsqueeze(0)) if self.world_size > 1 else new.unsqueeze(0)
            self.queue[:, :, B:] = self.queue[:, :, :-B].clone()
            self.queue[:, :, :B] = new.to(self.queue.dtype)
        return codes

    def swav_loss(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ, z) for the crops; renormalises the prototypes first."""
        self.normalize_prototypes_()
        B = crops[0].shape[0]
        z, scores = self.embed(crops)
        codes = self.assign(z, scores, B)
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = swapped_prediction_loss(scores.view(len(crops), B, -1), codes, self.crops_for_assign,
                                           self.temperature)
        return loss, z

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
        if len(crops) != sum(self.nmb_crops):
            raise UserError(f"got {len(crops)} crops per sample, --nmb_crops {self.nmb_crops} says {sum(self.nmb_crops)}")
        loss, _ = self.swav_loss(crops)
        return {"loss": loss, "queue_used": torch.tensor(float(self._use_the_queue), device=loss.device)}
