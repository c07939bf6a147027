"""Retrieval with faiss: top-K search, Recall@K and the cells of the compatibility matrix.

Conventions (see DESIGN.md, "Metrics, exactly"):

* Every query and every gallery item carries a *label*, a string id (xbt's one id model,
  :mod:`xbt.io`: integers from ``.npy``/faiss/safetensors are read as their string form). A gallery item is
  relevant to a query when their labels are equal. text→image: a caption's label is
  its image's id and each gallery image has its own id. image→text: an image's label
  is its id and each gallery caption carries the id of the image it describes, so a
  query hits when ANY caption of its image is in the top K. Gallery items whose label
  no query has (distractors, e.g. the rest of a production gallery) are allowed.
* Scores are inner products of L2-normalised float32 vectors (cosine similarity).
* Ties are broken deterministically: among equal scores the LOWER gallery row wins.
  faiss returns ties in no guaranteed order, so every result is re-sorted by
  (score descending, row ascending), and exact searches are widened until the tie
  group at the K-th place is complete. Identical captions therefore rank in gallery order.
* K larger than the gallery is clipped to the gallery size (Recall@K is then 100 %).
* Galleries are searched in shards of at most ``shard_rows`` rows (memory-mapped
  ``.npy`` works), each shard's canonical top-K merged into the running top-K. Under
  the total order above the merge is exact: sharded search equals unsharded search.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from .errors import InputError
from .evaluation.plan import DEFAULT_KS, DIRECTIONS, EXACT
from .io import read_ids

__all__ = ["DIRECTIONS", "DEFAULT_KS", "EXACT", "SearchConfig", "Labeled", "SearchResult", "CellResult",
           "check_vectors", "check_pair", "search", "recall_at_k", "evaluate_cell",
           "load_embeddings", "uses_gpu"]

logger = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # default shard: 1 GiB of float32 gallery rows
TIE_MARGIN = 16  # extra results fetched so that most tie groups are complete on the first try
VALIDATION_ROWS = 1 << 16
MISS = np.iinfo(np.int64).max  # rank of a query whose relevant items are all outside the results


@dataclass
class SearchConfig:
    """How galleries are searched.

    Attributes:
        index_factory: faiss index-factory string; ``"Flat"`` is exact inner product. Approximate
            ones (``"IVF256,Flat"``, ``"HNSW32"``, ``"IVF256,PQ16"``) are trained per shard on the
            shard itself and always reported next to exact search.
        search_parameters: faiss ``ParameterSpace`` string for approximate indexes, e.g. ``"nprobe=16"``.
        shard_rows: gallery rows per shard; ``None`` = as many as fit in 1 GiB.
        query_batch: queries per faiss call.
        gpu: use faiss GPU; ``None`` = when ``faiss.get_num_gpus() > 0``.
        progress: tqdm bars; ``None`` = only for large searches.
    """

    index_factory: str = EXACT
    search_parameters: str | None = None
    shard_rows: int | None = None
    query_batch: int = 8192
    gpu: bool | None = None
    progress: bool | None = None

    @property
    def exact(self) -> bool:
        return self.index_factory.replace(" ", "") in ("Flat", "IDMap,Flat")

    def exact_version(self) -> SearchConfig:
        """The same search with an exact index."""
        return SearchConfig(EXACT, None, self.shard_rows, self.query_batch, self.gpu, self.progress)


@dataclass
class Labeled:
    """Vectors (rows; ``np.ndarray`` or ``np.memmap``) and one string label (id) per row.

    ``space_id`` is the space the vectors live in when their source records it (a stored gallery).
    Labels of any type are stored as strings, so ``7`` from a ``.npy`` and ``"7"`` from a text
    file name the same item.
    """

    vectors: np.ndarray
    labels: np.ndarray
    space_id: str | None = None
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        self.labels = labels if labels.dtype.kind == "U" else labels.astype(str)
        if self.vectors.ndim != 2 or self.labels.shape != (self.vectors.shape[0],):
            raise InputError(f"Got {self.vectors.shape} vectors but {self.labels.shape} labels; "
                             f"need a 2-D array and one label per row.")

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def check(self, what: str) -> None:
        """:func:`check_vectors` once per object: a large stored gallery is read for validation one time only."""
        if not self._checked:
            check_vectors(self.vectors, what)
            self._checked = True


@dataclass
class SearchResult:
    """Top-K rows of the gallery per query, best first: ``scores`` float32 and ``rows`` int64 (−1 = none)."""

    scores: np.ndarray
    rows: np.ndarray


@dataclass
class CellResult:
    """One cell ``query→gallery`` of the matrix in one direction; recall in percent per K."""

    direction: str
    query: str
    gallery: str
    recall: dict[int, float]
    role: str | None = None  # see xbt.evaluation.plan.ROLES
    query_space_id: str | None = None
    gallery_space_id: str | None = None
    exact_recall: dict[int, float] | None = None  # set when an approximate index was used
    compatible: dict[int, bool] | None = None
    gap_recovered: dict[int, float | None] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.query}→{self.gallery}"


# ---------------------------------------------------------------------------------
# Input validation (runs before any search)
# ---------------------------------------------------------------------------------
def _row_blocks(count: int, rows: int) -> Iterator[slice]:
    for start in range(0, count, rows):
        yield slice(start, min(start + rows, count))


def check_vectors(vectors: np.ndarray, what: str) -> None:
    """Raise :class:`InputError` unless ``vectors`` is a non-empty 2-D array of finite, non-zero rows.

    Reads a memory-mapped array block by block, so it works for galleries larger than memory.
    """
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise InputError(f"{what}: expected a 2-D array (rows = vectors), got "
                         f"{getattr(vectors, 'shape', type(vectors).__name__)}.")
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise InputError(f"{what} is empty ({vectors.shape}); it needs at least one vector.")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise InputError(f"{what}: vectors must be numbers, got dtype {vectors.dtype}.")
    for block in _row_blocks(vectors.shape[0], VALIDATION_ROWS):
        chunk = np.asarray(vectors[block], dtype=np.float32)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            rows = (np.flatnonzero(bad)[:5] + block.start).tolist()
            raise InputError(f"{what}: {int(bad.sum())}+ vectors hold NaN or infinity (rows {rows}); "
                             f"drop or re-compute them.")
        zero = ~(np.abs(chunk) > 0).any(axis=1)
        if zero.any():
            rows = (np.flatnonzero(zero)[:5] + block.start).tolist()
            raise InputError(f"{what}: {int(zero.sum())}+ vectors are all zeros (rows {rows}) and have no "
                             f"direction to compare; drop them.")


def check_pair(queries: Labeled, gallery: Labeled, what: str, vectors: bool = True) -> None:
    """Check a query set and a gallery before searching one with the other (``vectors=False``: only
    dimensions and ids, for vectors already checked with :func:`check_vectors`)."""
    if vectors:
        queries.check(f"{what}: queries")
        gallery.check(f"{what}: gallery")
    if queries.dim != gallery.dim:
        raise InputError(f"{what}: queries have dimension {queries.dim} but the gallery has {gallery.dim}; "
                         f"a gallery must be searched with queries from the same embedding space.")
    missing = np.setdiff1d(np.unique(queries.labels), gallery.labels)
    if missing.size:
        raise InputError(f"{what}: {missing.size} query ids have no item in the gallery (e.g. "
                         f"{missing[:5].tolist()}); the ids of the queries must line up with the gallery's ids.")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, C-contiguous float32. Rows already of unit length (within 1e-6, as
    encoders emit them) are left exactly as they are, row by row, so the result of a row never depends
    on its neighbours (shards); when all are, nothing is copied (a memory map is read in once)."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", array, array))  # one pass, no temporary of the array's size
    scale = np.where(np.abs(norms - 1.0) <= 1e-6, np.float32(1.0), norms)
    if np.all(scale == 1.0):
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array / scale[:, None])


# ---------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------
def _canonical(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each result row by (score descending, gallery row ascending); missing (−1) last."""
    missing = rows < 0
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, rows),
                        np.where(missing, np.inf, -scores.astype(np.float64))), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(rows, order, -1)


def uses_gpu(config: SearchConfig) -> bool:
    """Whether searches with ``config`` run on faiss GPU."""
    available = getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if config.gpu and not available:
        raise InputError("SearchConfig.gpu=True but faiss sees no GPU (is faiss-gpu installed?).")
    return available if config.gpu is None else config.gpu


def _build_index(shard: np.ndarray, config: SearchConfig) -> faiss.Index:
    try:
        index = faiss.index_factory(shard.shape[1], config.index_factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(shard)
        index.add(shard)
        if config.search_parameters:
            faiss.ParameterSpace().set_index_parameters(index, config.search_parameters)
    except RuntimeError as error:  # faiss reports bad strings and too-small training sets this way
        message = str(error).strip().splitlines()[-1]
        raise InputError(f"faiss could not build {config.index_factory!r} (parameters {config.search_parameters!r}) "
                         f"on a shard of {shard.shape[0]} × {shard.shape[1]} vectors: {message}. Check the "
                         f"index-factory string, use fewer lists for small galleries, or larger shards.") from error
    if uses_gpu(config):
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except RuntimeError:  # e.g. HNSW has no GPU implementation
            logger.warning("faiss GPU cannot hold a %r index; searching it on the CPU", config.index_factory)
    return index


def _search_shard(index: faiss.Index, queries: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Canonical top-``k`` of one shard; exact search widens until the tie group at place k is complete."""
    size = index.ntotal
    wanted = min(k + TIE_MARGIN, size)
    while True:
        scores, rows = _canonical(*index.search(queries, wanted))
        if not exact or wanted == size:
            break
        # The k-th score also sits at the last fetched place: equal scores may have been cut off.
        if not (scores[:, -1] == scores[:, k - 1]).any():
            break
        wanted = min(2 * wanted, size)  # whole batch again: same query count, same arithmetic path
    return scores[:, :k], rows[:, :k]


def _merge(best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, rows: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    if best is not None:
        scores, rows = np.concatenate([best[0], scores], 1), np.concatenate([best[1], rows], 1)
    scores, rows = _canonical(scores, rows)
    return scores[:, :k], rows[:, :k]


def shard_rows_for(dim: int, config: SearchConfig) -> int:
    return config.shard_rows or max(1, SHARD_BYTES // (4 * dim))


def search(queries: np.ndarray, gallery: np.ndarray | PartlyReplaced, k: int, config: SearchConfig | None = None,
           desc: str = "search") -> SearchResult:
    """Top-``k`` gallery rows for each query by inner product of normalised vectors.

    ``gallery`` may be a memory-mapped array (or anything with ``shape`` and row slicing): it is
    read one shard at a time. Vectors are
    L2-normalised here (inputs need not be). Validate inputs with :func:`check_vectors` first.
    """
    config = config or SearchConfig()
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}.")
    count, dim = gallery.shape
    k = min(k, count)
    queries = normalized(queries)
    shard = shard_rows_for(dim, config)
    shards = list(_row_blocks(count, shard))
    batches = list(_row_blocks(queries.shape[0], config.query_batch))
    show = (queries.shape[0] * count >= 10**9) if config.progress is None else config.progress
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(batches)
    with tqdm(total=len(shards) * len(batches), desc=desc, unit="block", disable=not show) as bar:
        for block in shards:
            index = _build_index(normalized(gallery[block]), config)
            for number, batch in enumerate(batches):
                scores, rows = _search_shard(index, queries[batch], k, config.exact)
                rows = np.where(rows >= 0, rows + block.start, -1)
                results[number] = _merge(results[number], scores, rows, k)
                bar.update(1)
            del index
    return SearchResult(np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]))


# ---------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------
def first_hit_rank(result: SearchResult, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """0-based rank of the first relevant gallery item per query; :data:`MISS` when none is in the results."""
    found = result.rows >= 0
    labels = np.asarray(gallery_labels)[np.where(found, result.rows, 0)]  # a missing row is masked by `found`
    relevant = found & (labels == np.asarray(query_labels)[:, None])
    return np.where(relevant.any(1), relevant.argmax(1), MISS)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K in percent for each K (a hit when the first relevant item ranks below K)."""
    return {int(k): 100.0 * int((ranks < k).sum()) / len(ranks) for k in ks}


def recall_at_k(queries: Labeled, gallery: Labeled, ks: Sequence[int] = DEFAULT_KS,
                config: SearchConfig | None = None, desc: str = "search", validate: bool = True) -> dict[int, float]:
    """Recall@K (percent) of ``queries`` against ``gallery``; inputs are validated first unless told not to."""
    if validate:
        check_pair(queries, gallery, desc)
    result = search(queries.vectors, gallery.vectors, max(ks), config, desc)
    return recall_from_ranks(first_hit_rank(result, queries.labels, gallery.labels), ks)


def evaluate_cell(direction: str, query: str, gallery: str, queries: Labeled, items: Labeled,
                  ks: Sequence[int] = DEFAULT_KS, config: SearchConfig | None = None, validate: bool = True,
                  role: str | None = None) -> CellResult:
    """One cell; with an approximate index also the exact recall, so its loss can be reported.

    The cell records ``role`` and the space ids of both sides (from the vectors' ``space_id``).
    """
    config = config or SearchConfig()
    desc = f"{direction} {query}→{gallery}"
    cell = CellResult(direction, query, gallery, recall_at_k(queries, items, ks, config, desc, validate), role=role,
                      query_space_id=queries.space_id, gallery_space_id=items.space_id)
    if not config.exact:
        cell.exact_recall = recall_at_k(queries, items, ks, config.exact_version(), desc + " (exact)", False)
    return cell


# ---------------------------------------------------------------------------------
# A partly re-embedded gallery (the backfill curves of xbt.backfill search it)
# ---------------------------------------------------------------------------------
class PartlyReplaced:
    """A gallery with some rows replaced, read one shard at a time (never materialised whole)."""

    def __init__(self, base: np.ndarray, rows: np.ndarray, vectors: np.ndarray):
        order = np.argsort(rows)
        self.base, self.rows, self.vectors = base, np.asarray(rows)[order], np.asarray(vectors)[order]
        self.shape = base.shape

    def __getitem__(self, block: slice) -> np.ndarray:
        out = np.array(self.base[block], dtype=np.float32)
        low, high = np.searchsorted(self.rows, [block.start, block.stop])
        out[self.rows[low:high] - block.start] = self.vectors[low:high]
        return out


# ---------------------------------------------------------------------------------
# Stored embeddings (the user's own gallery and query sets)
# ---------------------------------------------------------------------------------
def _read_faiss(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    outer = faiss.read_index(str(path))
    index, ids = outer, None
    if hasattr(outer, "id_map"):  # IndexIDMap(2): keep `outer` alive, it owns the inner index
        ids = faiss.vector_to_array(outer.id_map).astype(np.int64)
        index = faiss.downcast_index(outer.index)
    try:
        if hasattr(index, "make_direct_map"):
            index.make_direct_map()
        vectors = index.reconstruct_n(0, index.ntotal)
    except RuntimeError as error:
        raise InputError(f"Cannot read the vectors back from faiss index {str(path)!r} ({error}); "
                         f"store the gallery as .npy or a Flat/IVF index.") from error
    return vectors, ids


def load_embeddings(path: str | Path, ids: str | Path | None = None, mmap: bool = True) -> Labeled:
    """Read stored embeddings with their ids (strings) and, when the file records it, their space id.

    An ``xbt embed`` output folder (its shards, ids and the manifest's space id), ``.npy`` (memory-mapped), ``.safetensors`` (tensor ``embeddings``, optional integer tensor ``ids``,
    optional metadata ``space_id``) or a faiss index (``.faiss``/``.index``; ids from an ``IndexIDMap``).
    ``ids`` names a separate ids file (read by :func:`xbt.io.read_ids`: one id per line, or a 1-D
    ``.npy``) and overrides stored ids; without any, ids are the row numbers. Vectors are validated
    (finite, non-zero) here, once: the returned :class:`Labeled` is not validated again.
    """
    path = Path(path)
    stored_ids, space_id = None, None
    if path.is_dir():
        from .embed import read_embeddings_dir

        vectors, stored_ids, manifest = read_embeddings_dir(path)
        stored_ids, space_id = np.asarray(stored_ids, dtype=str), manifest["space_id"]
    elif not path.is_file():
        raise InputError(f"Embeddings file {str(path)!r} does not exist.")
    elif path.suffix == ".npy":
        vectors = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), "np") as handle:
            space_id = (handle.metadata() or {}).get("space_id")
        tensors = load_file(str(path))
        if "embeddings" not in tensors:
            raise InputError(f"{str(path)!r} holds tensors {sorted(tensors)}; xbt expects one named 'embeddings' "
                             f"(and optionally 'ids').")
        vectors, stored_ids = tensors["embeddings"], tensors.get("ids")
    elif path.suffix in (".faiss", ".index"):
        vectors, stored_ids = _read_faiss(path)
    else:
        raise InputError(f"Unknown embeddings format {path.suffix!r} ({str(path)!r}); use .npy, .safetensors, "
                         f"or a faiss index saved as .faiss/.index.")
    if ids is not None:
        labels = read_ids(ids)
    elif stored_ids is not None:
        labels = [str(value) for value in stored_ids.tolist()]
    else:
        labels = [str(row) for row in range(vectors.shape[0])]
    if vectors.ndim == 2 and len(labels) != vectors.shape[0]:
        raise InputError(f"{str(path)!r} holds {vectors.shape[0]} vectors but {len(labels)} ids"
                         f"{f' in {str(ids)!r}' if ids is not None else ''}; there must be one id per vector.")
    check_vectors(vectors, str(path))
    stored = Labeled(vectors, np.asarray(labels, dtype=str), space_id)
    stored._checked = True
    return stored
