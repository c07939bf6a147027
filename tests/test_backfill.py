"""Backfill orderings, merge rules, curves and ``xbt plan``, each against a brute-force computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xbt import FingerprintMismatchError, InputError
from xbt.backfill import ORDERINGS, auc, backfill_curve, curves_by_ordering, item_gain, order_items, rank_merge
from xbt.cli import main as cli
from xbt.retrieval import Labeled, SearchConfig, SearchResult, recall_at_k


def _unit(rng, count: int, dim: int = 16) -> np.ndarray:
    vectors = rng.normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_neighbours(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarity = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(similarity, rows, 1)


def _hubness(vectors, k):
    return np.bincount(_brute_neighbours(vectors, k)[0].ravel(), minlength=len(vectors))


def _density(vectors, k):
    return _brute_neighbours(vectors, k)[1].mean(1)


@pytest.mark.parametrize("name, score", [("hubness", _hubness), ("density", _density)])
def test_gallery_orderings_sort_by_their_brute_force_score(name, score):
    vectors = _unit(np.random.default_rng(0), 120)
    order = order_items(name, vectors, k=5)
    expected = score(vectors, 5)
    assert np.all(np.diff(expected[order]) <= 1e-6)  # best first
    assert sorted(order) == list(range(120))


@pytest.mark.parametrize("name", ["hubness", "density"])
def test_an_approximate_neighbour_index_that_finds_fewer_than_k_still_orders_every_item(name):
    vectors = _unit(np.random.default_rng(1), 120)
    config = SearchConfig(index_factory="IVF16,Flat")  # ~7 items per list, one list probed: fewer than k+1 found
    order = order_items(name, vectors, k=10, config=config)
    assert sorted(order) == list(range(120))


def test_random_ordering_is_a_seeded_permutation():
    vectors = _unit(np.random.default_rng(0), 50)
    assert np.array_equal(order_items("random", vectors, 3), order_items("random", vectors, 3))
    assert not np.array_equal(order_items("random", vectors, 3), order_items("random", vectors, 4))
    with pytest.raises(InputError, match="Unknown backfill ordering 'nope'"):
        order_items("nope", vectors)
    with pytest.raises(InputError, match="oracle ordering needs evaluation queries"):
        order_items("oracle", vectors)
    assert set(ORDERINGS) == {"random", "hubness", "density", "uncertainty", "oracle"}


def test_rank_merge_interleaves_by_rank_the_reembedded_part_first():
    old = SearchResult(np.zeros((2, 3), np.float32), np.array([[10, 11, 12], [13, -1, -1]]))
    new = SearchResult(np.zeros((2, 2), np.float32), np.array([[1, 2], [-1, -1]]))
    merged = rank_merge(old, new, 4)
    assert merged.rows.tolist() == [[1, 10, 2, 11], [13, -1, -1, -1]]


def test_auc_is_the_trapezoid_area():
    assert auc([0.0, 0.5, 1.0], [0.0, 50.0, 100.0]) == pytest.approx(50.0)
    assert auc([0.0, 0.2, 1.0], [10.0, 10.0, 30.0]) == pytest.approx(2.0 + 16.0)


@pytest.fixture(scope="module")
def spaces():
    """An old gallery, the same items re-embedded in the old space (an adapter) and in another (a new model)."""
    rng = np.random.default_rng(5)
    old = Labeled(_unit(rng, 200), np.arange(200), "old")
    adapter = _unit(rng, 200)
    truth = adapter[:100]
    queries = Labeled(truth + 0.3 * _unit(rng, 100), np.arange(100), "old")
    new_gallery = Labeled(_unit(rng, 200, 24), np.arange(200), "new")
    new_queries = Labeled(new_gallery.vectors[:100] + 0.2 * _unit(rng, 100, 24), np.arange(100), "new")
    return {"old": old, "adapter": Labeled(adapter, old.labels, "old"), "queries": queries,
            "new_gallery": new_gallery, "new_queries": new_queries}


def test_score_merge_runs_from_the_old_gallery_to_the_reembedded_one(spaces):
    old, adapter, queries = spaces["old"], spaces["adapter"], spaces["queries"]
    ks = (1, 5)
    order = order_items("random", old.vectors, 7)
    curve = backfill_curve(queries, old, adapter, order=order, ks=ks)
    assert curve["merge"] == "score" and curve["fractions"] == pytest.approx([i / 10 for i in range(11)])
    assert [curve["recall"][k][0] for k in ks] == [recall_at_k(queries, old, ks)[k] for k in ks]
    assert [curve["recall"][k][-1] for k in ks] == [recall_at_k(queries, adapter, ks)[k] for k in ks]
    # a mid point equals the brute-force mixed gallery
    mixed = old.vectors.copy()
    mixed[order[:100]] = adapter.vectors[order[:100]]
    assert curve["recall"][1][5] == recall_at_k(queries, Labeled(mixed, old.labels), ks)[1]
    assert curve == backfill_curve(queries, old, adapter, order=order, ks=ks, config=SearchConfig(shard_rows=13))
    assert curve["auc"][1] == pytest.approx(auc(curve["fractions"], curve["recall"][1]))
    with pytest.raises(InputError, match="fractions"):
        backfill_curve(queries, old, adapter, fractions=(1.5,))


def test_a_score_merge_across_spaces_is_refused(spaces):
    with pytest.raises(FingerprintMismatchError, match="score merge compares scores of one space only"):
        backfill_curve(spaces["queries"], spaces["old"], spaces["new_gallery"])


def test_rank_merge_of_two_spaces_equals_brute_force(spaces):
    old, queries = spaces["old"], spaces["queries"]
    new_gallery, new_queries = spaces["new_gallery"], spaces["new_queries"]
    order = order_items("random", old.vectors, 1)
    curve = backfill_curve(queries, old, new_gallery, order=order, ks=(1, 5), reembedded_queries=new_queries)
    assert curve["merge"] == "rank"
    assert curve["recall"][5][0] == recall_at_k(queries, old, (5,))[5]
    assert curve["recall"][5][-1] == recall_at_k(new_queries, new_gallery, (5,))[5]
    # p = 0.5 by hand: each part's own ranking, interleaved new-first, hit@5 of the merged list
    chosen = np.zeros(200, dtype=bool)
    chosen[order[:100]] = True
    hits = []
    for q in range(100):
        lists = []
        for vectors, query, part in ((new_gallery.vectors, new_queries.vectors[q], chosen),
                                     (old.vectors, queries.vectors[q], ~chosen)):
            rows = np.flatnonzero(part)
            scores = vectors[rows] @ (query / np.linalg.norm(query))
            lists.append(rows[np.lexsort((rows, -scores))][:5])
        merged = [row for pair in zip(lists[0], lists[1], strict=True) for row in pair][:5]
        hits.append(q in merged)
    assert curve["recall"][5][5] == pytest.approx(100.0 * np.mean(hits))


def test_the_oracle_orders_by_measured_gain_and_beats_random(spaces):
    old, adapter, queries = spaces["old"], spaces["adapter"], spaces["queries"]
    curves = curves_by_ordering(queries, old, adapter, None, ["random", "oracle"], ks=(1,))
    assert curves["oracle"]["auc"][1] > curves["random"]["auc"][1] + 10  # the gain is concentrated on 100 rows
    gain = item_gain(np.array([3, 0, 9]), np.array([0, 0, 0]), np.array(["a", "b", "c"]),
                     np.array(["a", "b", "c", "c"]), 1)
    assert gain.tolist() == [1.0, 0.0, 0.5, 0.5]  # c's one gained hit is shared by its two rows


def test_hubs_first_fills_a_hub_ridden_gallery_faster_than_random():
    """20 clusters of 9 items, each with a hub at its centre (the last 20 rows). The old queries lean towards
    their cluster's centre, so each cluster's hub takes its queries' top 1 until it is re-embedded elsewhere;
    hubs are the nearest neighbour of all 9 items of their cluster, so hubness re-embeds them first."""
    rng = np.random.default_rng(3)
    centres = _unit(rng, 20, 32)
    owner = np.repeat(np.arange(20), 9)
    items = centres[owner] + 0.4 * _unit(rng, 180, 32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    old = Labeled(np.concatenate([items, centres]), np.arange(200), "s")
    leaning = centres[owner] + 0.35 * (items - centres[owner])
    queries = Labeled(leaning / np.linalg.norm(leaning, axis=1, keepdims=True), np.arange(180), "s")
    reembedded = Labeled(np.concatenate([items, _unit(rng, 20, 32)]), old.labels, "s")  # the hubs move away
    curves = curves_by_ordering(queries, old, reembedded, None, ["random", "hubness"], fractions=(0, .1, .2, .5, 1),
                                ks=(1,), neighbours=3)
    assert curves["random"]["recall"][1][0] < 5 and curves["random"]["recall"][1][-1] == 100.0
    assert set(order_items("hubness", old.vectors, k=3)[:20]) == set(range(180, 200))
    assert curves["hubness"]["recall"][1][1] == 100.0 > curves["random"]["recall"][1][1] + 50  # p = 0.1: 20 rows


def test_xbt_plan_writes_the_order_the_cost_and_the_predicted_curve(tmp_path, capsys):
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 60)
    np.save(tmp_path / "gallery.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(f"item-{i}" for i in range(60)) + "\n")
    (tmp_path / "embed").mkdir()
    (tmp_path / "embed" / "manifest.json").write_text(json.dumps({"runs": [{"items_per_second": 0.01}]}))
    (tmp_path / "eval").mkdir()
    curve = {"fractions": [0, 1], "replaceable": 60, "merge": "score", "recall": {"1": [1, 2]}, "auc": {"1": 1.5}}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"backfill": {"text→image": {
        "query": "xbt", "gallery": "old", "reembedded_by": "xbt", "seed": 0, "orderings": {"hubness": curve}}}}))
    args = ["plan", "--gallery", str(tmp_path / "gallery.npy"), "--gallery_ids", str(tmp_path / "ids.txt"),
            "--output_dir", str(tmp_path / "plan"), "--neighbours", "5"]
    assert cli([*args, "--embed_manifest", str(tmp_path / "embed"), "--eval_dir", str(tmp_path / "eval")]) == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    order = (tmp_path / "plan" / "order.txt").read_text().split()
    assert order == [f"item-{i}" for i in order_items("hubness", vectors, k=5)]
    assert plan["hours"] == pytest.approx(60 / 0.01 / 3600) and plan["count"] == 60
    assert plan["predicted"]["backfill"]["text→image"]["auc"] == {"1": 1.5}
    assert "1.67 h" in capsys.readouterr().out
    for extra, words in ((["--ordering", "oracle"], "oracle needs evaluation queries"),
                         (["--items_per_second", "0"], "must be positive"),
                         (["--embed_manifest", str(tmp_path)], "no manifest.json"),
                         (["--eval_dir", str(tmp_path / "embed")], "no metrics.json")):
        assert cli([*args, *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("xbt plan: error: ") and words in error and error.count("\n") == 1
