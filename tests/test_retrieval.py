"""Search and metrics against an independent brute-force computation, with real faiss indexes."""

import faiss
import numpy as np
import pytest
from safetensors.numpy import save_file

from xbt import InputError
from xbt.retrieval import (
    CellResult,
    Labeled,
    SearchConfig,
    evaluate_cell,
    MISS,
    first_hit_rank,
    load_embeddings,
    recall_at_k,
    search,
)
from xbt.evaluation.plan import BASELINE_ROLE, COMPATIBILITY, LOWER_BOUND, REINDEXED, UPPER_BOUND, score_cells
from xbt.errors import FingerprintMismatchError
from xbt.spaces import check_same_space

# Ids are strings end to end: the same sets keyed by integers, UUID-like keys and file names.
ID_STYLES = {
    "integers": lambda n: np.arange(n),
    "uuids": lambda n: np.array([f"{i * 7919 % 65536:08x}-3f2a-4c1b-9d7e-{i:012x}" for i in range(n)]),
    "file names": lambda n: np.array([f"img_{n - i:04d}.png" for i in range(n)]),  # sorted against row order
}


def _tied_vectors(rng, count: int, dim: int = 16) -> np.ndarray:
    """Unit vectors with entries ±1/4: every inner product is an exact multiple of 1/16, so ties are real."""
    return (rng.integers(0, 2, (count, dim)) * 0.5 - 0.25).astype(np.float32)


def _brute_force_recall(queries: Labeled, gallery: Labeled, ks) -> dict[int, float]:
    """Rank of each relevant item = #(higher score) + #(equal score at a lower row); float64, no top-k."""
    scores = queries.vectors.astype(np.float64) @ gallery.vectors.astype(np.float64).T
    hits = {k: 0 for k in ks}
    for q, row in enumerate(scores):
        best = min(int((row > row[r]).sum() + (row[:r] == row[r]).sum())
                   for r in np.flatnonzero(gallery.labels == queries.labels[q]))
        for k in ks:
            hits[k] += best < k
    return {k: 100.0 * hits[k] / len(queries) for k in ks}


def _captioned_set(rng, images: int = 40, ids=ID_STYLES["integers"]):
    """Image vectors, 1-4 caption vectors per image, some captions duplicated across images; ``ids(n)`` keys them."""
    image_vectors = _tied_vectors(rng, images)
    owners = np.repeat(np.arange(images), rng.integers(1, 5, images))
    flips = np.where(rng.random((len(owners), 16)) < 0.3, -1, 1).astype(np.float32)
    captions = image_vectors[owners] * flips  # noisy copies of their image: still exact ±1/4 entries
    duplicates = rng.choice(len(owners), 15, replace=False)
    captions[duplicates[5:]] = captions[duplicates[:5]].repeat(2, axis=0)  # identical caption vectors
    keys = ids(images)
    return Labeled(image_vectors, keys), Labeled(captions, keys[owners])


@pytest.mark.parametrize("ids", sorted(ID_STYLES))
@pytest.mark.parametrize("shard_rows,query_batch", [(None, 8192), (7, 40), (64, 3)])
def test_recall_matches_brute_force_with_ties_several_captions_and_large_k(shard_rows, query_batch, ids):
    rng = np.random.default_rng(0)
    images, captions = _captioned_set(rng, ids=ID_STYLES[ids])
    assert images.labels.dtype.kind == "U"  # whatever the ids were, labels are strings
    ks = (1, 5, 10, 200)  # 200 > both galleries
    config = SearchConfig(shard_rows=shard_rows, query_batch=query_batch)
    for queries, gallery in ((captions, images), (images, captions)):  # text→image, image→text
        got = recall_at_k(queries, gallery, ks, config)
        assert got == _brute_force_recall(queries, gallery, ks)
        assert got[200] == 100.0
    # Ties decide the outcome here: many equal scores, and the lower row wins.
    scores = captions.vectors @ images.vectors.T
    assert (np.sort(scores, 1)[:, -1] == np.sort(scores, 1)[:, -2]).mean() > 0.2


def test_missing_results_are_never_hits_whatever_the_ids():
    """An approximate index returns fewer than k rows (row −1); no id, not even "-1", matches a missing row."""
    rng = np.random.default_rng(8)
    gallery = Labeled(rng.normal(size=(200, 8)).astype(np.float32), np.array(["-1", *map(str, range(199))]))
    queries = Labeled(rng.normal(size=(50, 8)).astype(np.float32), np.full(50, "-1"))
    result = search(queries.vectors, gallery.vectors, 60, SearchConfig("IVF20,Flat", "nprobe=1"))
    assert (result.rows < 0).any()
    expected = [next((rank for rank, row in enumerate(rows) if row >= 0 and gallery.labels[row] == "-1"), MISS)
                for rows in result.rows]
    assert first_hit_rank(result, queries.labels, gallery.labels).tolist() == expected


def test_ties_go_to_the_lower_gallery_row():
    gallery = np.tile(np.eye(4, dtype=np.float32)[:1], (50, 1))  # 50 identical vectors
    result = search(np.eye(4, dtype=np.float32)[:1], gallery, 10)
    assert result.rows.tolist() == [list(range(10))]
    assert (result.scores == 1.0).all()


def test_sharded_memory_mapped_search_equals_unsharded(tmp_path):
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(5000, 32)).astype(np.float32)
    gallery[4000:4100] = gallery[100:200]  # exact duplicates across shards
    gallery[::3] /= np.linalg.norm(gallery[::3], axis=1, keepdims=True)  # some rows already unit length
    np.save(tmp_path / "gallery.npy", gallery)
    mapped = np.load(tmp_path / "gallery.npy", mmap_mode="r")
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    queries[:50] = gallery[100:150]
    whole = search(queries, gallery, 10)
    sharded = search(queries, mapped, 10, SearchConfig(shard_rows=777, query_batch=128))
    assert np.array_equal(whole.rows, sharded.rows)
    assert np.array_equal(whole.scores, sharded.scores)
    assert (whole.rows[:50, 0] == np.arange(100, 150)).all()  # the duplicate at 4000+ loses the tie
    # The exact result is the true top 10 (numpy, float64).
    normed = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    reference = np.argsort(-(queries[50:].astype(np.float64) @ normed.T.astype(np.float64)), 1, kind="stable")[:, :10]
    assert np.array_equal(whole.rows[50:], reference)


def test_approximate_index_reports_its_loss_against_exact_search():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 24))
    gallery = (centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 24))).astype(np.float32)
    queries = gallery[:400] + 0.05 * rng.normal(size=(400, 24)).astype(np.float32)
    q, g = Labeled(queries, np.arange(400)), Labeled(gallery, np.arange(3000))
    exact = evaluate_cell("text→image", "a", "b", q, g)
    assert exact.exact_recall is None
    ivf = evaluate_cell("text→image", "a", "b", q, g, config=SearchConfig("IVF16,Flat", "nprobe=1"))
    assert ivf.exact_recall == exact.recall
    assert ivf.recall[10] <= exact.recall[10]
    # Probing every list makes IVF exhaustive: no loss at all.
    full = evaluate_cell("text→image", "a", "b", q, g, config=SearchConfig("IVF16,Flat", "nprobe=16"))
    assert full.recall == exact.recall
    hnsw = evaluate_cell("text→image", "a", "b", q, g, config=SearchConfig("HNSW16"))
    assert 0 < hnsw.recall[1] <= 100 and hnsw.exact_recall == exact.recall
    # K beyond the gallery with IVF probing one list: items outside it are missing (−1), never hits.
    small_config = SearchConfig("IVF8,Flat", "nprobe=1")
    small = Labeled(gallery[:200], np.arange(200))
    far = rng.normal(size=(200, 24)).astype(np.float32)  # queries unrelated to their labelled item
    found = search(far, small.vectors, 500, small_config).rows
    assert (found == -1).any()
    expected = 100.0 * np.mean([i in row for i, row in enumerate(found)])
    assert recall_at_k(Labeled(far, np.arange(200)), small, (500,), small_config) == {500: expected}
    assert expected < 100
    with pytest.raises(InputError, match="could not build 'IVF999,Flat'"):
        search(queries, gallery[:100], 5, SearchConfig("IVF999,Flat"))
    with pytest.raises(InputError, match="index-factory string"):
        search(queries, gallery, 5, SearchConfig("NoSuchIndex"))


@pytest.mark.parametrize("case,message", [
    ("nan", "NaN"), ("zero", "all zeros"), ("dim", "dimension"), ("ids", "line up"), ("empty", "empty"),
])
def test_bad_input_is_refused_before_searching(case, message):
    rng = np.random.default_rng(3)
    gallery, queries = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    labels = np.arange(5)
    if case == "nan":
        gallery[3, 2] = np.nan
    elif case == "zero":
        queries[1] = 0
    elif case == "dim":
        queries = queries[:, :6]
    elif case == "ids":
        labels = np.array([0, 1, 2, 3, 99])
    else:
        queries = queries[:0]
        labels = labels[:0]
    with pytest.raises(InputError, match=message):
        recall_at_k(Labeled(queries, labels), Labeled(gallery, np.arange(20)))


def test_stored_embeddings_in_every_format_give_the_same_gallery(tmp_path):
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    ids = rng.choice(10_000, 30, replace=False).astype(np.int64)
    np.save(tmp_path / "g.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)))
    save_file({"embeddings": vectors, "ids": ids}, str(tmp_path / "g.safetensors"))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(vectors, ids)
    faiss.write_index(index, str(tmp_path / "g.faiss"))
    for loaded in (load_embeddings(tmp_path / "g.npy", tmp_path / "ids.txt"),
                   load_embeddings(tmp_path / "g.safetensors"), load_embeddings(tmp_path / "g.faiss")):
        assert np.array_equal(np.asarray(loaded.vectors), vectors)
        assert loaded.labels.tolist() == [str(i) for i in ids]
    assert load_embeddings(tmp_path / "g.npy").labels.tolist() == [str(i) for i in range(30)]
    for style in ("uuids", "file names"):  # any string ids, from a text file or a .npy of strings
        keys = ID_STYLES[style](30)
        (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
        np.save(tmp_path / "keys.npy", keys)
        for ids_file in ("keys.txt", "keys.npy"):
            assert load_embeddings(tmp_path / "g.faiss", tmp_path / ids_file).labels.tolist() == keys.tolist()
    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(InputError, match="one id per vector"):
        load_embeddings(tmp_path / "g.npy", tmp_path / "short.txt")
    with pytest.raises(InputError, match="Unknown embeddings format"):
        load_embeddings(tmp_path / "ids.txt")
    save_file({"vectors": vectors}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InputError, match="'embeddings'"):
        load_embeddings(tmp_path / "wrong.safetensors")


def test_a_stored_gallery_records_its_space_and_is_validated_once(tmp_path):
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    save_file({"embeddings": vectors}, str(tmp_path / "g.safetensors"), metadata={"space_id": "open_clip-aaaa"})
    stored = load_embeddings(tmp_path / "g.safetensors")
    assert stored.space_id == "open_clip-aaaa"
    np.save(tmp_path / "g.npy", vectors)
    assert load_embeddings(tmp_path / "g.npy").space_id is None  # not recorded: nothing to compare
    with pytest.raises(FingerprintMismatchError, match="open_clip-aaaa.*open_clip-bbbb|open_clip-bbbb.*open_clip-aaaa"):
        check_same_space("open_clip-bbbb", stored.space_id, "The stored gallery")
    # Validated on loading: a later check of the same object does not read the vectors again.
    stored.vectors = np.full_like(vectors, np.nan)  # what a second full pass would now refuse
    stored.check("again")
    fresh = Labeled(np.full_like(vectors, np.nan), stored.labels)
    with pytest.raises(InputError, match="NaN"):
        fresh.check("fresh")


def test_compatibility_and_gap_recovered_come_from_the_roles_of_the_cells():
    """Scores read roles and space ids, never names: the bound cells here are called v1 and v2."""
    def cell(name, role, r1, direction="text→image", space="s1"):
        query, gallery = name.split("→")
        return CellResult(direction, query, gallery, {1: r1}, role=role, query_space_id=space, gallery_space_id=space)

    cells = [cell("v1→v1", LOWER_BOUND, 20.0), cell("v2→v2", UPPER_BOUND, 40.0, space="s2"),
             cell("v3→v1", COMPATIBILITY, 30.0), cell("psi→v1", BASELINE_ROLE, 15.0), cell("v3→v3", REINDEXED, 35.0),
             cell("v1→v1", LOWER_BOUND, 10.0, "image→text"), cell("v3→v1", COMPATIBILITY, 12.0, "image→text"),
             cell("w→w2", COMPATIBILITY, 50.0, space="elsewhere")]
    score_cells(cells)
    by = {(c.direction, c.name): c for c in cells}
    assert by[("text→image", "v3→v1")].compatible == {1: True}
    assert by[("text→image", "v3→v1")].gap_recovered == {1: pytest.approx(0.5)}
    assert by[("text→image", "psi→v1")].compatible == {1: False}
    assert by[("text→image", "psi→v1")].gap_recovered == {1: pytest.approx(-0.25)}
    assert by[("text→image", "v3→v3")].compatible is None  # reindexed: not scored
    assert by[("text→image", "w→w2")].compatible is None  # another gallery space than the lower bound's
    assert by[("image→text", "v3→v1")].gap_recovered == {1: None}  # no upper bound in that direction
    assert by[("image→text", "v3→v1")].compatible == {1: True}
