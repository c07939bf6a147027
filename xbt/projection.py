"""ψ: the projection from the new model's embedding space into the old model's.

Three shapes, all returning L2-normalised vectors in the old space:

- ``linear``: one affine map.
- ``mlp``: the affine map plus a residual MLP whose last layer starts at zero, so
  training starts from the linear solution and only adds what it needs.
- ``orthogonal``: an orthogonal map onto ``old_dim + extra_dims`` (after BT²/OCA):
  the first ``old_dim`` coordinates are the compatible part, the extra ones can keep
  information the old space has no room for. Orthogonality preserves the geometry
  of the new space (exactly when ``old_dim + extra_dims >= new_dim``: orthonormal columns).

BT² and OCA in xbt are one ψ shape, not two code paths. Both append extra dimensions to
the compatible ones and constrain the map to be orthogonal; the old-space terms of stage 2
train the first ``old_dim`` coordinates and the ``full_new`` term (:data:`xbt.losses.PAIR_TERMS`)
the whole normalised vector, so the extra ones carry what the old space cannot hold. They
differ in what the orthogonal layer sees, which in xbt (a frozen new backbone, ψ its only
head) is one choice of ``extra_dims``:

- BT² (Zhou et al., 2211.03989): an orthonormal *basis transformation* of the new feature,
  square: ``kind=orthogonal, extra_dims = new_dim - old_dim`` (the full space is a rotation of
  the new one, so before training full→full retrieval equals the new model's);
- OCA (Ricci et al., 2408.08793): an orthogonal layer over an *expanded* feature, any
  ``extra_dims > 0``. Here the feature is the frozen new model's and ψ is linear in it, so
  ``old_dim + extra_dims`` beyond ``new_dim`` adds no information, and fewer keeps only the
  part of the new space that training selects.

Saved and loaded through huggingface_hub's ``PyTorchModelHubMixin`` (config.json +
model.safetensors; nothing is unpickled). The config records the ids of the
spaces ψ maps between (``source_space``: the new model's, ``target_space``: the old
model's, see :mod:`xbt.spaces`), so it can refuse to be used with others. Stage 1
writes exactly this folder, and an adapter directory holds it as ``projection/``.
The shape options (:class:`~xbt.adapter_config.ProjectionConfig`) live in a torch-free
module so that commands can show ``--help`` without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils import parametrizations

from .adapter_config import ProjectionConfig
from .errors import InputError
from .spaces import check_same_space
from .weights_mixin import SafeModelHubMixin


Parts = tuple[nn.Module, "nn.Module | None"]
"""(the map of every kind, ``linear``; an optional residual added to it): the state-dict names saved ψ use."""


def _affine(new_dim: int, old_dim: int, hidden_dim: int | None, extra_dims: int) -> Parts:
    return nn.Linear(new_dim, old_dim), None


def _affine_and_residual_mlp(new_dim: int, old_dim: int, hidden_dim: int | None, extra_dims: int) -> Parts:
    linear = nn.Linear(new_dim, old_dim)  # first: the same random draws as the affine kind
    hidden = hidden_dim or 2 * max(new_dim, old_dim)
    residual = nn.Sequential(nn.Linear(new_dim, hidden), nn.GELU(), nn.Linear(hidden, old_dim))
    nn.init.zeros_(residual[-1].weight)  # starts as the affine map: training adds only what it needs
    nn.init.zeros_(residual[-1].bias)
    return linear, residual


def _orthogonal(new_dim: int, old_dim: int, hidden_dim: int | None, extra_dims: int) -> Parts:
    return parametrizations.orthogonal(nn.Linear(new_dim, old_dim + extra_dims, bias=False)), None


KIND_BUILDERS = {"linear": _affine, "mlp": _affine_and_residual_mlp, "orthogonal": _orthogonal}
"""ψ kind -> its builder; the kinds and their options are listed (torch-free) in
:data:`xbt.adapter_config.PROJECTION_KINDS`. A new kind = a row there and a builder here."""


class Projection(nn.Module, SafeModelHubMixin, library_name="xbt", tags=["xbt", "backward-compatible"]):
    """Map new-space embeddings ``(N, new_dim)`` to normalised old-space ones ``(N, old_dim)``."""

    def __init__(
        self,
        new_dim: int,
        old_dim: int,
        kind: str = "mlp",
        hidden_dim: int | None = None,
        extra_dims: int = 0,
        source_space: str | None = None,
        target_space: str | None = None,
    ):
        super().__init__()
        ProjectionConfig(kind, hidden_dim, extra_dims)  # validates (InputError)
        self.new_dim, self.old_dim, self.kind = new_dim, old_dim, kind
        self.extra_dims = extra_dims
        self.source_space, self.target_space = source_space, target_space
        self.linear, self.residual = KIND_BUILDERS[kind](new_dim, old_dim, hidden_dim, extra_dims)

    @classmethod
    def build(cls, new_dim: int, old_dim: int, config: ProjectionConfig, **spaces) -> Projection:
        """A fresh ψ of the shape ``config`` describes; ``spaces``: ``source_space`` / ``target_space``."""
        return cls(new_dim, old_dim, **asdict(config), **spaces)

    @property
    def full_dim(self) -> int:
        """Dimension of the full output (:meth:`extended`): the old dims plus any extra ones."""
        return self.old_dim + self.extra_dims

    def extended(self, new_embeddings: torch.Tensor) -> torch.Tensor:
        """Unnormalised output including any extra (non-compatible) dimensions."""
        if new_embeddings.shape[-1] != self.new_dim:
            raise InputError(f"Projection expects new-space vectors of dimension {self.new_dim}, "
                             f"got {new_embeddings.shape[-1]}. Was it trained for another new model?")
        output = self.linear(new_embeddings)
        if self.residual is not None:
            output = output + self.residual(new_embeddings)
        return output

    def forward(self, new_embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised old-space vectors: the first ``old_dim`` coordinates, renormalised."""
        return nn.functional.normalize(self.extended(new_embeddings)[..., : self.old_dim], dim=-1)

    def split(self, new_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised compatible (old-space) vectors and normalised full vectors (``None`` without extra dims),
        from one pass: the full-space loss term trains all ``full_dim`` coordinates, the old-space terms the first
        ``old_dim`` of them."""
        output = self.extended(new_embeddings)
        compatible = nn.functional.normalize(output[..., : self.old_dim], dim=-1)
        return compatible, nn.functional.normalize(output, dim=-1) if self.extra_dims else None

    def check_spaces(self, source: str | None = None, target: str | None = None) -> None:
        """Raise :class:`FingerprintMismatchError` if ψ maps between other spaces than these."""
        check_same_space(self.source_space, source, "The input model",
                         "This ψ was trained for another new model; retrain it or load the model it was made for.")
        check_same_space(self.target_space, target, "The target model",
                         "This ψ maps into another old space; retrain it or use the old model it was made for.")

    @classmethod
    def from_linear_map(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **spaces) -> Projection:
        """A ``linear`` ψ with given weight ``(old_dim, new_dim)`` and bias (training-free baselines)."""
        old_dim, new_dim = weight.shape
        projection = cls(new_dim, old_dim, kind="linear", **spaces)
        with torch.no_grad():
            projection.linear.weight.copy_(weight)
            projection.linear.bias.copy_(bias if bias is not None else torch.zeros(old_dim))
        return projection
