"""Training-free baselines recover known maps on synthetic data and behave like any saved ψ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbt.baselines import fit_baseline, fit_procrustes, fit_ridge
from xbt.cache import build_cache, EmbeddingSource
from xbt.errors import InputError
from xbt.projection import Projection


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
    for name in ("procrustes", "ridge"):
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
    with pytest.raises(InputError, match="Unknown baseline"):
        fit_baseline("pca", np.zeros((3, 4)), np.zeros((3, 4)))
