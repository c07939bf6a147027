import math

import pytest
import torch
from torch.nn import functional as F

from xbt.losses import Temperature, WeightedLoss, add_noise, cosine_loss, info_nce, mse_loss, paired_loss


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_a_direct_computation():
    q, k = _unit(5, 8, 0), _unit(5, 8, 1)
    logits = 10.0 * q @ k.T
    by_hand = 0.0
    for i in range(5):
        by_hand += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    torch.testing.assert_close(info_nce(q, k, 10.0), by_hand / 10)


def test_info_nce_is_low_for_matching_pairs_and_high_for_shuffled():
    q = _unit(16, 8, 0)
    assert info_nce(q, q, 50.0) < 0.1
    assert info_nce(q, q.roll(1, 0), 50.0) > 1.0


def test_info_nce_with_a_key_bank_uses_explicit_positives():
    bank = _unit(20, 8, 2)
    queries = bank[[3, 7, 11]]
    loss = info_nce(queries, bank, 100.0, positives=torch.tensor([3, 7, 11]), symmetric=False)
    assert loss < 0.05
    wrong = info_nce(queries, bank, 100.0, positives=torch.tensor([4, 8, 12]), symmetric=False)
    assert wrong > 5
    with pytest.raises(ValueError, match="one-way"):
        info_nce(queries, bank, 1.0, positives=torch.tensor([3, 7, 11]))
    with pytest.raises(ValueError, match="as many keys"):
        info_nce(queries, bank, 1.0)


def test_cosine_and_mse():
    a, b = _unit(4, 6, 0), _unit(4, 6, 1)
    assert cosine_loss(a, a).abs() < 1e-6 and mse_loss(a, a) == 0
    torch.testing.assert_close(cosine_loss(a, -a), torch.tensor(2.0))
    # For unit vectors, squared distance is 2 − 2 cos.
    torch.testing.assert_close(mse_loss(a, b), 2 * cosine_loss(a, b))
    with pytest.raises(ValueError, match="Unknown loss"):
        paired_loss("hinge", a, b, 1.0)


def test_noise_keeps_unit_norm_and_is_seeded():
    x = _unit(8, 16, 0)
    assert add_noise(x, 0.0) is x
    one = add_noise(x, 0.1, torch.Generator().manual_seed(1))
    two = add_noise(x, 0.1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(one, two)
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(8))
    assert 0.9 < (one * x).sum(-1).mean() < 1.0


def test_temperature_learnable_or_fixed():
    learnable, fixed = Temperature(0.07), Temperature(0.05, learnable=False)
    assert math.isclose(float(learnable().detach()), 1 / 0.07, rel_tol=1e-5)
    assert [p for p in fixed.parameters()] == [] and len(list(learnable.parameters())) == 1
    assert float(Temperature(0.001)().detach()) == 100.0


def test_weighted_loss_skips_zero_weights_and_reports_terms():
    calls = []

    def term(value):
        def compute():
            calls.append(value)
            return torch.tensor(value)
        return compute

    total, parts = WeightedLoss({"a": 2.0, "b": 0.0, "c": 0.5})({"a": term(1.0), "b": term(9.0), "c": term(4.0)})
    assert float(total) == 4.0 and parts == {"a": 1.0, "c": 4.0} and 9.0 not in calls
    with pytest.raises(ValueError, match="No way to compute"):
        WeightedLoss({"x": 1.0})({"a": term(1.0)})
    with pytest.raises(ValueError, match="non-negative"):
        WeightedLoss({"x": -1.0})
    with pytest.raises(ValueError, match="At least one"):
        WeightedLoss({"x": 0.0})
