"""The negative-key queue, kept as buffers of the method module (so it is in ``state_dict``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def init_queue(dim: int, K: int, planes: int | None = None) -> torch.Tensor:
    """randn, L2-normalised along ``dim``: shape (dim, K) (MoCo) or (planes, dim, K) (MoCo-M)."""
    shape = (dim, K) if planes is None else (planes, dim, K)
    return F.normalize(torch.randn(*shape), dim=-2)


@torch.no_grad()
def enqueue_(queue: torch.Tensor, keys: torch.Tensor, ptr: torch.Tensor | int) -> None:
    """Write ``keys`` (n×dim, already gathered in rank order) into columns ptr, ptr+1, ...
    of ``queue`` (dim×K), wrapping around the end. ``ptr`` may be a device tensor: no host sync."""
    K = queue.shape[-1]
    n = keys.shape[0]
    if n > K:
        raise ValueError(f"cannot enqueue {n} keys into a queue of length {K}")
    idx = (torch.as_tensor(ptr, device=queue.device).reshape(()) + torch.arange(n, device=queue.device)) % K
    queue[:, idx] = keys.T.to(queue.dtype)


@torch.no_grad()
def advance_(ptr: torch.Tensor, n: int, K: int) -> None:
    """ptr ← (ptr + n) mod K, in place on the device."""
    ptr.add_(n).remainder_(K)


def check_queue_divisible(K: int, global_batch: int, flag: str = "--moco-k") -> None:
    """The official code asserts K % (B·W) == 0 so that the pointer never splits a batch."""
    from ..errors import UserError
    if K % global_batch:
        raise UserError(f"{flag} {K} must be divisible by the global batch size {global_batch} "
                        f"(per-process batch x processes); pick e.g. {K - K % global_batch or global_batch}")
