"""Helpers for losses computed over the global batch of all processes."""

from __future__ import annotations

import torch


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (rows may differ per process) from every process, keeping gradients.

    Every process then computes the loss of the global batch, so a run on N processes
    follows the same trajectory as one process with the same global batch (the gathered
    copies' gradients are summed back to their owners, and DDP averages over processes).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    rows = [int(c) for c in counts]
    padded = torch.cat([tensor, tensor.new_zeros((max(rows) - tensor.shape[0], *tensor.shape[1:]))])
    if tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])
