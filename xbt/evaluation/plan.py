"""The evaluation plan: the spaces an evaluation is given, the cells they make, and each cell's role.

A :class:`Space` is one set of vectors an evaluation can search with or search in: a
name for display, a *kind* (what it is: the old model, the new model, an adapter, a
training-free baseline, a blend, a denoised reference), the ``space_id`` its vectors
live in, their dimension, and where the vectors come from (an :class:`~xbt.spaces.Encoder`,
a :class:`Derivation` of other spaces' vectors, or stored files only).

Which cells exist follows from space ids, never from names: a query space can search a
gallery when both live in the same space (equal ``space_id`` and dimension) and
:data:`CELL_ROLES` gives their kinds a role. So an adapter whose ``space_id`` is the old
model's gives ``xbt→old`` (role ``compatibility``), a chained adapter (v3 trained against a
v2 adapter, writing v1's space) gives ``v3→v1`` with no special case, and an encoder of any
other space gives no cell against the old gallery at all.

Scores (DESIGN.md, "Metrics, exactly") are read from roles: every cell of a
:data:`SCORED_ROLES` role is compared with the ``lower bound`` and ``upper bound`` cells of
its direction and gallery space (compatible: R@K > lower; gap recovered:
(R − lower) / (upper − lower)). Reports, plots and the model card read the roles too.

This module is pure Python (no torch, numpy or faiss), so the CLI can import it for ``--help``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

TEXT, IMAGE = "text", "image"
MODALITIES = (TEXT, IMAGE)
DIRECTIONS = ("text→image", "image→text")
QUERY_MODALITY = {"text→image": TEXT, "image→text": IMAGE}
GALLERY_MODALITY = {"text→image": IMAGE, "image→text": TEXT}
DEFAULT_KS = (1, 5, 10)  # Recall@K reported at these K
EXACT = "Flat"  # the faiss index factory of exact inner-product search

# Kinds of spaces: what produced the vectors.
OLD_MODEL = "old model"  # the model whose gallery exists (its space is the one adapters write into)
NEW_MODEL = "new model"  # the new model in its own (native) space
ADAPTER = "adapter"  # an encoder that writes into another model's space (XBTModel)
FULL_SPACE = "adapter full space"  # an adapter's own full vectors, old dims + extra dims (BT²/OCA ψ)
BASELINE = "baseline"  # a training-free map of the new model's vectors into another space (Procrustes, ...)
BLENDED_BASELINE = "blended baseline"  # a peer method's queries mixing old and mapped new queries (SLERP)
BLENDED = "blended"  # adapter queries mixed with the old model's queries (text only)
DENOISED = "denoised"  # one query per image: the mean of the old model's captions of it (text only)
KINDS = (OLD_MODEL, NEW_MODEL, ADAPTER, FULL_SPACE, BASELINE, BLENDED_BASELINE, BLENDED, DENOISED)
QUERY_ONLY = frozenset({BLENDED, BLENDED_BASELINE, DENOISED})  # kinds with no gallery of their own

SLERP = "slerp"  # the training-free SLERP peer (xbt.evaluation.fitted.slerp_space)


def check_fit_on(modalities: Sequence[str]) -> None:
    """Fitted baselines learn from support pairs of text and/or image vectors; anything else is refused."""
    if not modalities or set(modalities) - set(MODALITIES):
        raise InputError(f"Baselines are fitted on text and/or image pairs, got {list(modalities)}.")


# Roles of cells, in report order.
LOWER_BOUND = "lower bound"  # old→old: what the service does today
UPPER_BOUND = "upper bound"  # new→new: what a full backfill with the new model would give
COMPATIBILITY = "compatibility"  # adapter queries against the gallery of the space it writes into
BLENDED_ROLE = "blended"  # blended queries against that gallery
BASELINE_ROLE = "baseline"  # a training-free map against that gallery
REFERENCE = "reference"  # queries derived from the old model (e.g. denoised), against its gallery
REINDEXED = "reindexed"  # a gallery re-embedded by an adapter or baseline (or into its full space), searched
ROLES = (LOWER_BOUND, UPPER_BOUND, COMPATIBILITY, BLENDED_ROLE, BASELINE_ROLE, REFERENCE, REINDEXED)
SCORED_ROLES = frozenset({COMPATIBILITY, BLENDED_ROLE, BASELINE_ROLE, REFERENCE})

# A space searching its own gallery. An adapter's full space is its own (no other encoder writes into it): only
# its self cell exists, what re-embedding the gallery with the adapter's full vectors gives, next to new→new.
SELF_ROLES: dict[str, str] = {OLD_MODEL: LOWER_BOUND, NEW_MODEL: UPPER_BOUND, ADAPTER: REINDEXED,
                              FULL_SPACE: REINDEXED, BASELINE: REINDEXED}
# (query kind, gallery kind) -> role, for two different spaces with the same space id.
CELL_ROLES: dict[tuple[str, str], str] = {
    (ADAPTER, OLD_MODEL): COMPATIBILITY,
    (BLENDED, OLD_MODEL): BLENDED_ROLE,
    (BASELINE, OLD_MODEL): BASELINE_ROLE,
    (BLENDED_BASELINE, OLD_MODEL): BASELINE_ROLE,
    (DENOISED, OLD_MODEL): REFERENCE,
    (OLD_MODEL, ADAPTER): REINDEXED,  # clients still on the old model, gallery backfilled by the adapter
    (BLENDED, ADAPTER): REINDEXED,
}


@dataclass(frozen=True)
class Derivation:
    """Vectors computed from other spaces' vectors of the same items (no encoder runs).

    ``function(modality, *inputs)`` gets the :class:`~xbt.retrieval.Labeled` vectors of the
    spaces named in ``inputs`` for one modality and returns the derived :class:`~xbt.retrieval.Labeled`.
    """

    inputs: tuple[str, ...]
    function: Callable[..., Any] = field(compare=False, repr=False)


@dataclass
class Space:
    """One space entry of an evaluation (see the module docstring)."""

    name: str
    kind: str
    space_id: str
    dim: int
    encoder: Any = None  # an xbt.spaces.Encoder that embeds the evaluation set
    derive: Derivation | None = None
    modalities: tuple[str, ...] = MODALITIES
    model_id: str | None = None  # keys the embedding cache; None: never cached
    # fitted on the support split before its derivation runs: fit({modality: {space name: Labeled}}, EvalConfig)
    # gets the support items' vectors of the spaces before it and returns what metrics.json records of the fit
    fit: Callable[[dict[str, dict[str, Any]], Any], dict[str, Any]] | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"Space {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")
        if not self.space_id:
            raise InputError(f"Space {self.name!r} ({self.kind}) records no space id; every encoder must state "
                             f"the space it writes into (xbt.spaces.Encoder.space_id).")
        if self.encoder is not None and self.derive is not None:
            raise InputError(f"Space {self.name!r}: give an encoder or a derivation, not both.")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise InputError(f"Space {self.name!r}: modalities must be among {MODALITIES}, got {sorted(unknown)}.")

    @property
    def has_gallery(self) -> bool:
        return self.kind not in QUERY_ONLY

    def describe(self) -> dict[str, Any]:
        """The space as metrics.json records it."""
        return {"kind": self.kind, "space_id": self.space_id, "model_id": self.model_id, "dim": self.dim,
                "modalities": list(self.modalities), **self.info}


def uncertainty_heads(spaces: Sequence[Space]) -> dict[str, Any]:
    """The uncertainty heads (FastFill, :mod:`xbt.uncertainty`) of the spaces' encoders that carry one, by space
    name: the input of the ``uncertainty`` backfill ordering."""
    return {space.name: space.encoder.uncertainty_head for space in spaces
            if getattr(space.encoder, "uncertainty_head", None) is not None}


@dataclass(frozen=True)
class PlannedCell:
    """A cell ``query→gallery`` in one direction, with its role and both space ids."""

    direction: str
    query: str
    gallery: str
    role: str
    query_space_id: str
    gallery_space_id: str

    @property
    def name(self) -> str:
        return f"{self.query}→{self.gallery}"


def cell_role(query: Space, gallery: Space) -> str | None:
    """The role of ``query`` searching ``gallery``, or None when the pair is no cell.

    Raises :class:`InputError` when two spaces claim one space id with different dimensions.
    """
    if query.space_id != gallery.space_id:
        return None
    if query.dim != gallery.dim:
        raise InputError(f"Spaces {query.name!r} ({query.dim}-d) and {gallery.name!r} ({gallery.dim}-d) both claim "
                         f"space {query.space_id}; vectors of one space have one dimension.")
    if query.name == gallery.name:
        return SELF_ROLES.get(query.kind)
    return CELL_ROLES.get((query.kind, gallery.kind))


def plan_cells(spaces: Sequence[Space], available: dict[str, tuple[set[str], set[str]]]) -> list[PlannedCell]:
    """Every cell the spaces make, in report order (direction, role, gallery, the gallery's own queries first,
    then the order the spaces were given).

    ``available[direction]`` names the spaces that have query vectors and gallery vectors in that direction.
    """
    by_name = {space.name: space for space in spaces}
    cells = []
    for direction in DIRECTIONS:
        if direction not in available:
            continue
        queries, galleries = available[direction]
        for gallery in spaces:
            if gallery.name not in galleries or not gallery.has_gallery:
                continue
            for query in spaces:
                role = cell_role(query, gallery) if query.name in queries else None
                if role is not None:
                    cells.append(PlannedCell(direction, query.name, gallery.name, role, query.space_id,
                                             gallery.space_id))
    order = {name: position for position, name in enumerate(by_name)}
    return sorted(cells, key=lambda c: (DIRECTIONS.index(c.direction), ROLES.index(c.role), order[c.gallery],
                                        c.query != c.gallery, order[c.query]))


def score_cells(cells: Sequence[Any]) -> None:
    """Fill ``compatible`` and ``gap_recovered`` of every scored cell from the bound cells of its direction.

    ``cells`` are :class:`~xbt.retrieval.CellResult` (``direction``, ``role``, ``gallery_space_id``, ``recall``).
    Compatible: R@K(cell) > R@K(lower bound). Gap recovered: (R − lower) / (upper − lower), ``None`` when
    there is no upper bound or it equals the lower one.
    """
    def bound(role: str, direction: str) -> Any:
        found = [c for c in cells if c.role == role and c.direction == direction]
        return found[0] if len(found) == 1 else None

    for cell in cells:
        lower = bound(LOWER_BOUND, cell.direction)
        if cell.role not in SCORED_ROLES or lower is None or lower.gallery_space_id != cell.gallery_space_id:
            continue
        upper = bound(UPPER_BOUND, cell.direction)
        cell.compatible = {k: cell.recall[k] > lower.recall[k] for k in cell.recall}
        cell.gap_recovered = {}
        for k in cell.recall:
            span = None if upper is None else upper.recall[k] - lower.recall[k]
            cell.gap_recovered[k] = None if not span else (cell.recall[k] - lower.recall[k]) / span
