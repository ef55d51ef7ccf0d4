"""MoCo-M and LORAC (moco_m_lorac.md §1, §2): multi-crop MoCo with two key crops and two queue planes,
and LORAC's per-sample nuclear-norm prior on the positive logit.

Notation: C crops of B samples; ``q`` is (C, B, D) unit query embeddings (crop-major), ``k`` is
(2, B, D) unit key embeddings of crops 0 and 1, ``queue`` is (2, D, K) (plane j holds keys of crop j).
For every loop index j ∈ ``crops_for_assign`` = [0, 1] a *term* is (positive key crop p, query crops S,
negative plane n); its rows are the (c ∈ S, b) pairs with logits [q_{c,b}·k_{p,b}, q_{c,b}ᵀQ_n] and
target 0. L = ½ Σ_j mean-CE_j. The pairings:

=============  ==========================  ====================================================
``hardcoded1`` p = 1−j, S = all∖{1}, n = 1−j  MoCo-M as coded (§1.3): self-positive q₀·k₀, q₁ unused
``key_crop``   p = 1−j, S = all∖{p}, n = p    the intended symmetric multi-crop MoCo
``lorac``      p = j,   S = all∖{j}, n = 1−j  LORAC as coded (§2.1): negatives of the *other* plane
=============  ==========================  ====================================================
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..errors import UserError
from ..models.backbones import build_encoder, convert_sync_batchnorm, feat_dim, sync_bn_plan
from ..models.heads import moco_head
from ..models.momentum import make_momentum_copy, momentum_update_, shuffle_bn_forward
from ..models.queue import advance_, enqueue_, init_queue
from .base import ContrastiveMethod, topk_accuracy

log = logging.getLogger("ssl")

PAIRINGS = ("hardcoded1", "key_crop", "lorac")


def pairing_terms(pairing: str, n_crops: int) -> list[tuple[int, list[int], int]]:
    """``[(positive key crop, query crops, negative queue plane)]`` for j = 0, 1 (module table)."""
    terms = []
    for j in (0, 1):
        if pairing == "hardcoded1":
            p, excl, n = 1 - j, 1, 1 - j
        elif pairing == "key_crop":
            p, excl, n = 1 - j, 1 - j, 1 - j
        elif pairing == "lorac":
            p, excl, n = j, j, 1 - j
        else:
            raise ValueError(f"unknown pairing {pairing!r}; choose from {PAIRINGS}")
        terms.append((p, [c for c in range(n_crops) if c != excl], n))
    return terms


def _as_stack(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.stack(list(x))


def term_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, p: int, S: list[int], n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_pos, l_neg) of one term, rows ordered (c, b) crop-major as the official reshape:
    l_pos (|S|·B, 1) = q_{c,b}·k_{p,b}; l_neg (|S|·B, K) = q_{c,b}ᵀ Q_n. No temperature."""
    qs = q[S].reshape(-1, q.shape[-1])
    ks = k[p].repeat(len(S), 1)
    l_pos = torch.einsum("nc,nc->n", qs, ks).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", qs, queue[n])
    return l_pos, l_neg


def mocom_loss(q_crops, k_crops, queue: torch.Tensor, T: float, pairing: str = "hardcoded1"
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MoCo-M loss (§1.3): ½ Σ_j CE([l_pos, l_neg]/T, 0) over the term's rows. Returns the loss and
    the tempered logits of each term (for accuracy)."""
    q, k = _as_stack(q_crops), _as_stack(k_crops)
    loss, all_logits = 0.0, []
    terms = pairing_terms(pairing, q.shape[0])
    for p, S, n in terms:
        l_pos, l_neg = term_logits(q, k, queue, p, S, n)
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = loss + F.cross_entropy(logits, target) / len(terms)
        all_logits.append(logits)
    return loss, all_logits


def nuclear_norm_per_sample(q_global: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """r_b = ‖M_b‖_* with M_b = [q_{0,b}; …; q_{G−1,b}; k_{0,b}; k_{1,b}] (§2.2): (G+2)×D per sample,
    G = ``nmb_crops[0]`` global queries, keys detached. Batched SVD in fp32 outside autocast.
    Returns (B,). The gradient w.r.t. M_b is U Vᵀ (thin SVD)."""
    M = torch.cat([q_global, k.detach()], dim=0).transpose(0, 1)  # (B, G+2, D)
    with torch.autocast(device_type=M.device.type, enabled=False):
        return torch.linalg.matrix_norm(M.float(), ord="nuc")


def lorac_loss(q_crops, k_crops, queue: torch.Tensor, T: float, beta: float, n_global: int,
               use_temperature: bool = False, active: bool = True, pairing: str = "lorac"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LORAC loss (§2.2). Before the switch (``active=False``): ½ Σ_j CE([l_pos, l_neg]/T, 0) with the
    LORAC pairing and rank 0. After: logits [l_pos − r_b/β, l_neg] with **no /T** (official), or
    ([l_pos − r_b/β, l_neg])/T with ``use_temperature``; r_b is repeated for every query crop of
    sample b. Returns (loss, mean_b r_b (0 before the switch), tempered logits of the last term)."""
    q, k = _as_stack(q_crops), _as_stack(k_crops)
    B = q.shape[1]
    terms = pairing_terms(pairing, q.shape[0])
    rank = nuclear_norm_per_sample(q[:n_global], k) if active else None
    loss, logits = 0.0, None
    for p, S, n in terms:
        l_pos, l_neg = term_logits(q, k, queue, p, S, n)
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        if active:
            shifted = torch.cat([l_pos - rank.repeat(l_pos.shape[0] // B).unsqueeze(1) / beta, l_neg], dim=1)
            used = shifted / T if use_temperature else shifted
        else:
            used = logits
        target = torch.zeros(used.shape[0], dtype=torch.long, device=used.device)
        loss = loss + F.cross_entropy(used, target) / len(terms)
    mean_rank = rank.mean() if active else q.sum() * 0.0
    return loss, mean_rank.detach(), logits


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Consecutive runs of crops with equal width (SwAV's ``unique_consecutive`` + ``cumsum``)."""
    out, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-1] != crops[start].shape[-1]:
            out.append((start, i))
            start = i
    return out


class MoCoM(ContrastiveMethod):
    """MoCo-M model (§1.1-1.4), also LORAC's (``lorac=True``).

    Buffers ``queue`` (2, dim, K) and one ``queue_ptr``. Per step: ``encoder_q`` once per
    resolution group; EMA update of ``encoder_k`` (parameters only, constant m); crops 0 and 1 as one
    2B batch through ``encoder_k`` with shuffle-BN; the loss uses a queue snapshot taken before the
    enqueue of the gathered keys (crop-0 keys → plane 0, crop-1 keys → plane 1, same pointer)."""

    def __init__(self, arch: str, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.2,
                 mlp: bool = True, nmb_crops: Sequence[int] = (2,), pairing: str = "hardcoded1",
                 lorac: bool = False, beta: float = 15.0, epoch_lorac_starts: int = 100,
                 lorac_use_temperature: bool = False, shuffle_groups: int = 1, cifar_stem: bool = False):
        super().__init__()
        if nmb_crops[0] < 2:
            raise UserError(f"--nmb_crops {list(nmb_crops)}: the first resolution group needs at least 2 crops "
                            "(crops 0 and 1 are the key crops)")
        if pairing not in PAIRINGS:
            raise UserError(f"unknown pairing {pairing!r}; choose from {', '.join(PAIRINGS)}")
        self.arch, self.K, self.m, self.T = arch, K, m, T
        self.nmb_crops, self.pairing, self.shuffle_groups = list(nmb_crops), pairing, shuffle_groups
        self.lorac, self.beta, self.epoch_lorac_starts = lorac, beta, epoch_lorac_starts
        self.lorac_use_temperature = lorac_use_temperature
        self.lorac_active = False
        self.encoder_q = build_encoder(arch, moco_head(feat_dim(arch), dim, mlp, -1), cifar_stem=cifar_stem)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        self.register_buffer("queue", init_queue(dim, K, planes=2))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def on_epoch_start(self, epoch: int, ctx=None) -> None:
        active = self.lorac and epoch >= self.epoch_lorac_starts
        if active and not self.lorac_active:
            log.info("epoch %d: LORAC low-rank prior on (beta %g, %s)", epoch, self.beta,
                     "logits / temperature" if self.lorac_use_temperature else "no temperature, as the official code")
        self.lorac_active = active

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        """``k`` = [k_crop0 (B); k_crop1 (B)] of this rank. Gathered in rank order and split into 2W
        chunks of B: even chunks (crop 0 of every rank) → plane 0, odd chunks → plane 1 (§1.4)."""
        keys = D.gather_no_grad(k)
        B = k.shape[0] // 2
        chunks = keys.split(B, dim=0)
        n = keys.shape[0] // 2  # K % n == 0 is checked at start-up (check_queue_divisible)
        enqueue_(self.queue[0], torch.cat(chunks[0::2]), self.queue_ptr)
        enqueue_(self.queue[1], torch.cat(chunks[1::2]), self.queue_ptr)
        advance_(self.queue_ptr, n, self.K)

    def embed(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (C, B, D), k (2, B, D)), unit-norm in fp32 (apex O1 runs ``normalize`` in fp32)."""
        B = crops[0].shape[0]
        if len(crops) < 2 or crops[1].shape[-1] != crops[0].shape[-1]:
            raise UserError("MoCo-M needs crops 0 and 1 in the first resolution group (--nmb_crops ≥ 2 first)")
        q_parts, k = [], None
        for s, e in resolution_groups(crops):
            x = torch.cat(crops[s:e])
            q_parts.append(self.encoder_q(x))
            if s == 0:
                with torch.no_grad():
                    momentum_update_(self.encoder_k, self.encoder_q, self.m)
                    k = shuffle_bn_forward(self.encoder_k, x[:2 * B], self.shuffle_groups)
        q = F.normalize(torch.cat(q_parts).float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        return q.view(len(crops), B, -1), k.view(2, B, -1)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        q, k = self.embed(crops)
        queue = self.queue.clone().detach()
        self._dequeue_and_enqueue(k.reshape(-1, k.shape[-1]))
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=q.device.type, enabled=False):
            if self.lorac:
                loss, rank, logits = lorac_loss(q, k, queue.float(), self.T, self.beta, self.nmb_crops[0],
                                                self.lorac_use_temperature, self.lorac_active, self.pairing)
                accs = [topk_accuracy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))]
                out["rank"] = rank
            else:
                loss, all_logits = mocom_loss(q, k, queue.float(), self.T, self.pairing)
                accs = [topk_accuracy(lg, torch.zeros(lg.shape[0], dtype=torch.long, device=lg.device))
                        for lg in all_logits]
        out["loss"] = loss
        out["acc1"] = torch.stack([a[0] for a in accs]).mean()
        out["acc5"] = torch.stack([a[1] for a in accs]).mean()
        return out


def convert_sync_bn(method: MoCoM, mode: str, group_size: int, device: torch.device) -> str:
    """``--sync_bn pytorch|apex``: SyncBatchNorm for ``encoder_q`` only (§3.3); see
    :func:`~src.models.backbones.sync_bn_plan`. Returns what was done, for the log."""
    convert, group, what = sync_bn_plan(mode, group_size, device)
    if convert:
        method.encoder_q = convert_sync_batchnorm(method.encoder_q, process_group=group)  # timm norm-act layers too
    return what
