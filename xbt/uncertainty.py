"""FastFill's uncertainty head: which stored items the old model represents worst, from their old vectors alone.

After Jaeckle et al. (FastFill, ICLR 2023): a small head reads an item's stored old-space
vector ``o`` and predicts where the adapter would put the item (``μ(o)``, in the same
space) and how unsure that prediction is (``log σ²(o)``). It is trained in stage 2 (the
``uncertainty`` loss term, on the stored old image embeddings) with the Gaussian negative
log-likelihood of the adapter's own image vector ``a`` (:func:`xbt.losses.gaussian_nll`)::

    ½ · ( ‖a − μ(o)‖² / σ² + d · log σ² ) / d

``a`` is detached: the head learns from the adapter and never changes it. Items with a
large σ are those whose old vector says least about their better embedding, so re-embedding
them first gains most (FastFill reports backfill AUC 66.5 for σ order against 62.8 for
random on ImageNet). The ``uncertainty`` backfill ordering (:mod:`xbt.backfill`) and
``xbt plan --adapter`` read the head; it needs only the stored vectors, no model run.

Saved inside the adapter directory as ``uncertainty/`` (config.json + model.safetensors,
through ``PyTorchModelHubMixin``); the config records the space id of the vectors it reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .spaces import check_same_space
from .weights_mixin import SafeModelHubMixin

UNCERTAINTY_DIR = "uncertainty"


class UncertaintyHead(nn.Module, SafeModelHubMixin, library_name="xbt", tags=["xbt", "backfill"]):
    """``(N, dim)`` stored old-space vectors -> (normalised predicted adapter vector, log σ²), one σ per item."""

    def __init__(self, dim: int, hidden_dim: int | None = None, space_id: str | None = None):
        super().__init__()
        self.dim, self.space_id = dim, space_id
        hidden = hidden_dim or 2 * dim
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim + 1))

    def forward(self, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if stored.shape[-1] != self.dim:
            raise InputError(f"The uncertainty head reads {self.dim}-d stored vectors, got {stored.shape[-1]}-d ones.")
        output = self.body(stored)
        return F.normalize(stored + output[..., :self.dim], dim=-1), output[..., self.dim]

    @torch.no_grad()
    def log_variance(self, stored: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """log σ² of every row of ``stored`` (float32 numpy), in chunks (a gallery may be large)."""
        parameter = next(self.parameters())
        # np.array copies each chunk: a memmapped gallery is read-only
        scores = [self(torch.from_numpy(np.array(stored[start:start + batch_size], dtype=np.float32))
                       .to(parameter.device))[1].cpu().numpy()
                  for start in range(0, len(stored), batch_size)]
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def check_space(self, space_id: str | None, what: str = "The gallery") -> None:
        check_same_space(self.space_id, space_id, what,
                         "The uncertainty head was trained on stored vectors of another space; use the adapter "
                         "trained against this gallery.")



def load_head(adapter: str | Path) -> UncertaintyHead:
    """The uncertainty head of an adapter folder, without loading the adapter's models."""
    folder = Path(adapter) / UNCERTAINTY_DIR
    if not (folder / "model.safetensors").is_file():
        raise InputError(f"{adapter} has no uncertainty head ({UNCERTAINTY_DIR}/): train stage 2 with stored old image "
                         f"embeddings (--old_image_embeddings) and the uncertainty loss term on (its default there).")
    return UncertaintyHead.from_pretrained(folder).eval()
