"""Training-free baselines recover known maps on synthetic data and behave like any saved ψ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbt.baselines import BASELINES, fit_baseline, fit_low_rank, fit_mlp, fit_procrustes, fit_ridge
from xbt.cache import build_cache, EmbeddingSource
from xbt.errors import InputError
from xbt.evaluation.fitted import ALPHAS, alpha_curve, best_alpha, slerp, support_ids
from xbt.projection import Projection
from xbt.retrieval import Labeled


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((max(rows, cols), max(rows, cols))))
    return q[:rows, :cols]


@pytest.mark.parametrize("new_dim,old_dim", [(24, 24), (32, 16)])
def test_procrustes_recovers_an_orthogonal_map(new_dim, old_dim):
    # whitened inputs: with fewer old dims, Procrustes (max trace) is exact only when newᵀnew ∝ I
    new = np.linalg.qr(np.random.default_rng(0).standard_normal((500, new_dim)))[0] * np.sqrt(500)
    truth = orthonormal(old_dim, new_dim, seed=1)  # old = new @ truth.T: rotation (+ dropped dims)
    old = new @ truth.T
    projection = fit_procrustes(new, old)
    np.testing.assert_allclose(projection.linear.weight.detach().numpy(), truth, atol=1e-5)
    assert projection.linear.bias.abs().max() == 0


def test_procrustes_pads_when_the_old_space_is_larger():
    rng = np.random.default_rng(0)
    new = rng.standard_normal((400, 12))
    truth = orthonormal(20, 12, seed=2)  # orthonormal columns: an isometric embedding into 20 dims
    projection = fit_procrustes(new, new @ truth.T)
    np.testing.assert_allclose(projection.linear.weight.detach().numpy(), truth, atol=1e-5)


def test_ridge_recovers_an_affine_map():
    rng = np.random.default_rng(0)
    new = rng.standard_normal((2000, 16))
    weight, bias = rng.standard_normal((8, 16)), rng.standard_normal(8)
    old = new @ weight.T + bias + 1e-3 * rng.standard_normal((2000, 8))
    projection = fit_ridge(new, old, alpha=1e-8)
    np.testing.assert_allclose(projection.linear.weight.detach().numpy(), weight, atol=1e-3)
    np.testing.assert_allclose(projection.linear.bias.detach().numpy(), bias, atol=1e-3)
    strong = fit_ridge(new, old, alpha=10.0)
    assert strong.linear.weight.norm() < 0.2 * projection.linear.weight.norm()  # the penalty shrinks


def test_fits_stream_over_a_memory_mapped_cache_and_save_like_a_trained_projection(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    new = rng.standard_normal((300, 12)).astype(np.float32)
    truth = orthonormal(12, 12, seed=4)
    sources = [EmbeddingSource("new", "synthetic-new", 12, lambda rows: torch.from_numpy(new[[int(r) for r in rows]])),
               EmbeddingSource("old", "synthetic-old", 12,
                               lambda rows: torch.from_numpy((new[[int(r) for r in rows]] @ truth.T).astype(np.float32)))]
    cache = build_cache(tmp_path / "cache", sources, [str(i) for i in range(300)], dtype="float32", shard_size=64,
                        progress=False)
    monkeypatch.setattr("xbt.baselines.CHUNK_ROWS", 50)  # several chunks across several shards
    fingerprints = {"source_space": "synthetic-new", "target_space": "synthetic-old"}
    for name in ("procrustes", "ridge", "low_rank"):
        projection = fit_baseline(name, cache["new"], cache["old"], **fingerprints)
        projection.save_pretrained(tmp_path / name)
        loaded = Projection.from_pretrained(tmp_path / name)
        assert loaded.kind == "linear" and loaded.target_space == "synthetic-old"
        inputs = torch.from_numpy(new[:20])
        expected = torch.nn.functional.normalize(inputs @ torch.from_numpy(truth.T).float(), dim=-1)
        torch.testing.assert_close(loaded(inputs), expected, atol=1e-3, rtol=0)


def test_bad_inputs():
    with pytest.raises(InputError, match="paired"):
        fit_procrustes(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(InputError, match="at least one"):
        fit_ridge(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(InputError, match="Unknown baseline 'pca'"):
        fit_baseline("pca", np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(InputError, match="Unknown baseline 'ridge\\+scale'"):
        fit_baseline("ridge+scale", np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(InputError, match="rank >= 1"):
        fit_low_rank(np.ones((3, 4)), np.ones((3, 4)), rank=0)
    with pytest.raises(InputError, match="steps >= 1"):
        fit_mlp(np.ones((3, 4)), np.ones((3, 4)), steps=0)


def low_rank_pairs(rank: int, seed: int = 0, count: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs related by an affine map whose weight has rank ``rank`` (no noise), and that weight."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((12, rank)) @ rng.standard_normal((rank, 20))  # (old 12, new 20)
    new = rng.standard_normal((count, 20))
    return new, new @ weight.T + rng.standard_normal(12), weight


def squared_error(projection: Projection, new: np.ndarray, old: np.ndarray) -> float:
    with torch.no_grad():
        output = projection.extended(torch.from_numpy(new).float()).double().numpy()
    return float(((output - old) ** 2).sum(1).mean())


def test_low_rank_recovers_a_rank_r_map_at_rank_r_but_not_below():
    new, old, weight = low_rank_pairs(rank=4)
    exact = fit_low_rank(new, old, rank=4, alpha=0.0)
    np.testing.assert_allclose(exact.linear.weight.detach().numpy(), weight, atol=1e-3)
    assert np.linalg.matrix_rank(exact.linear.weight.detach().double().numpy(), tol=1e-3) == 4
    assert squared_error(exact, new, old) < 1e-8 * float((old ** 2).sum(1).mean())
    short = fit_low_rank(new, old, rank=3, alpha=0.0)
    assert squared_error(short, new, old) > 0.01 * float(((old - old.mean(0)) ** 2).sum(1).mean())
    # the rank-3 fit is the best rank-3 map: no worse than truncating the true weight's SVD
    left, values, right = np.linalg.svd(weight)
    truncated = Projection.from_linear_map(torch.from_numpy((left[:, :3] * values[:3]) @ right[:3]).float(),
                                           short.linear.bias.detach())
    assert squared_error(short, new, old) <= squared_error(truncated, new, old) * (1 + 1e-4)


@pytest.mark.parametrize("name", ["procrustes+diag", "ridge+diag", "low_rank+diag"])
def test_diagonal_scaling_recovers_a_known_scale(name):
    new = np.linalg.qr(np.random.default_rng(0).standard_normal((600, 10)))[0] * np.sqrt(600)  # whitened
    scale = np.linspace(0.5, 2.0, 10)
    projection = fit_baseline(name, new, new * scale)
    np.testing.assert_allclose(projection.linear.weight.detach().numpy(), np.diag(scale), atol=1e-4)
    if name == "procrustes+diag":  # without the scale the best orthogonal map is the identity
        np.testing.assert_allclose(fit_procrustes(new, new * scale).linear.weight.detach().numpy(), np.eye(10),
                                   atol=1e-5)


def test_mlp_fits_a_nonlinear_relation_that_no_affine_map_can():
    rng = np.random.default_rng(0)
    new = rng.standard_normal((4000, 6))
    mixing = rng.standard_normal((6, 6))
    old = new @ mixing.T + np.tanh(2 * new[:, ::-1]) * 1.5  # affine part plus a nonlinear residual
    train, test = slice(0, 3000), slice(3000, None)
    ridge = fit_ridge(new[train], old[train], alpha=1e-8)
    mlp = fit_mlp(new[train], old[train], hidden_dim=64, steps=1500, batch_size=512, learning_rate=3e-3)
    assert mlp.kind == "mlp"
    assert squared_error(mlp, new[test], old[test]) < 0.2 * squared_error(ridge, new[test], old[test])
    again = fit_mlp(new[train], old[train], hidden_dim=64, steps=5, batch_size=512)
    same = fit_mlp(new[train], old[train], hidden_dim=64, steps=5, batch_size=512)
    torch.testing.assert_close(again.state_dict(), same.state_dict())  # seeded: reproducible


def test_every_registered_baseline_maps_new_vectors_to_normalised_old_space_vectors():
    new, old, _ = low_rank_pairs(rank=4, count=300)
    for name in [*BASELINES, *(f"{n}+diag" for n in BASELINES)]:
        projection = fit_baseline(name, new, old, **({"steps": 3} if name.startswith("mlp") else {}))
        assert isinstance(projection, Projection), name
        output = projection(torch.from_numpy(new[:5]).float())
        assert output.shape == (5, 12)
        torch.testing.assert_close(output.norm(dim=-1), torch.ones(5))


# -- SLERP (training-free peer): geodesic interpolation and the α fitted on a support split ---------------------------
def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_slerp_walks_the_geodesic_from_the_old_query_to_the_aligned_one(alpha):
    start, end = unit_rows(50, 16, seed=0), unit_rows(50, 16, seed=1)
    mixed = slerp(start, end, alpha).astype(np.float64)
    if alpha in (0.0, 1.0):
        np.testing.assert_allclose(mixed, start if alpha == 0.0 else end, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-6)
    angle = np.arccos(np.clip((start * end).sum(1), -1, 1))
    to_start = np.arccos(np.clip((mixed * start).sum(1), -1, 1))
    to_end = np.arccos(np.clip((mixed * end).sum(1), -1, 1))
    np.testing.assert_allclose(to_start, alpha * angle, atol=1e-3)  # the angle is split α : (1 − α)
    np.testing.assert_allclose(to_end, (1 - alpha) * angle, atol=1e-3)
    # on the great circle: in the plane of start and end
    basis = np.linalg.qr(np.stack([start, end], axis=2))[0]  # (50, 16, 2)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", basis, np.einsum("nij,ni->nj", basis, mixed)), mixed, atol=1e-5)


def geodesic(start: np.ndarray, end: np.ndarray, fraction: float) -> np.ndarray:
    """Independent of xbt: the point at ``fraction`` of the arc via the tangent direction (not the sine formula)."""
    cosine = (start * end).sum(1, keepdims=True)
    tangent = end - cosine * start
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    angle = np.arccos(np.clip(cosine, -1, 1))
    return np.cos(fraction * angle) * start + np.sin(fraction * angle) * tangent


def test_alpha_fitting_picks_the_alpha_that_maximises_support_recall():
    """Each target lies at α = 0.35 along the arc from its old query to its aligned query, and decoys (other ids)
    lie on the same arc at 0.30 and 0.40: only α = 0.35 retrieves every target first."""
    old, aligned = unit_rows(40, 24, seed=2), unit_rows(40, 24, seed=3)
    ids = np.array([f"q{i}" for i in range(40)])
    gallery_rows = [geodesic(old, aligned, 0.35)] + [geodesic(old, aligned, f) for f in (0.30, 0.40)]
    gallery = Labeled(np.concatenate(gallery_rows).astype(np.float32),
                      np.concatenate([ids, np.char.add(ids, "-a"), np.char.add(ids, "-b")]))
    queries_old, queries_aligned = Labeled(old.astype(np.float32), ids), Labeled(aligned.astype(np.float32), ids)
    curve = alpha_curve(queries_old, queries_aligned, gallery, ALPHAS, (1, 5))
    # brute force: exact inner products in float64, per α
    for index, alpha in enumerate(ALPHAS):
        scores = slerp(old, aligned, alpha).astype(np.float64) @ gallery.vectors.astype(np.float64).T
        top = np.argsort(-scores, axis=1, kind="stable")
        for k in (1, 5):
            hits = (gallery.labels[top[:, :k]] == ids[:, None]).any(1)
            assert curve[k][index] == pytest.approx(100.0 * hits.mean())
    assert curve[1][ALPHAS.index(0.35)] == 100.0 and max(curve[1][:ALPHAS.index(0.35)]) == 0.0
    assert best_alpha(ALPHAS, curve) == 0.35


def test_alpha_ties_go_to_the_mean_over_k_then_to_the_smaller_alpha():
    alphas = (0.0, 0.5, 1.0)
    assert best_alpha(alphas, {1: [50.0, 50.0, 50.0], 5: [60.0, 70.0, 70.0]}) == 0.5
    assert best_alpha(alphas, {1: [10.0, 50.0, 50.0]}) == 0.5
    assert best_alpha(alphas, {1: [10.0, 20.0, 30.0], 5: [90.0, 90.0, 10.0]}) == 1.0


def test_support_split_is_seeded_disjoint_and_refuses_degenerate_fractions():
    ids = np.array([f"img{i}" for i in range(50)])
    first = support_ids(ids, 0.2, seed=1)
    assert len(first) == 10 and set(first) <= set(ids)
    np.testing.assert_array_equal(first, support_ids(ids, 0.2, seed=1))
    assert set(first) != set(support_ids(ids, 0.2, seed=2))
    for fraction in (0.0, 1.0, 0.001, 0.999):
        with pytest.raises(InputError, match="support fraction"):
            support_ids(ids, fraction, seed=0)


def test_low_rank_at_full_rank_is_ridge_and_its_penalty_is_ridge_s():
    new, old, _ = low_rank_pairs(rank=4, count=200)
    for alpha in (1e-3, 0.5):
        full, ridge = fit_low_rank(new, old, rank=12, alpha=alpha), fit_ridge(new, old, alpha=alpha)
        torch.testing.assert_close(full.state_dict(), ridge.state_dict(), atol=1e-4, rtol=1e-4)
    # under a penalty the rank-r solution is no worse (on the penalised objective) than truncating the ridge weight
    def objective(projection, alpha):
        return squared_error(projection, new, old) + alpha * float(projection.linear.weight.detach().double().pow(2).sum())
    left, values, right = np.linalg.svd(fit_ridge(new, old, alpha=0.5).linear.weight.detach().double().numpy())
    short = fit_low_rank(new, old, rank=2, alpha=0.5)
    truncated = fit_ridge(new, old, alpha=0.5)
    with torch.no_grad():
        truncated.linear.weight.copy_(torch.from_numpy((left[:, :2] * values[:2]) @ right[:2]))
    assert objective(short, 0.5) <= objective(truncated, 0.5) * (1 + 1e-5)
