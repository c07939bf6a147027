import math

import pytest
import torch
from torch.nn import functional as F

from xbt.errors import InputError
from xbt.losses import (PAIR_TERMS, TEXT_LOSSES, LossTerm, Temperature, add_noise, cosine_loss, info_nce, mse_loss,
                        register, resolve_weights, uses_temperature)


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


NO_GALLERY, GALLERY = frozenset({"old_captions"}), frozenset({"old_captions", "old_images"})


def test_default_weights_follow_what_the_data_provides():
    assert resolve_weights(PAIR_TERMS, {}, GALLERY) == {"new_new": 1.0, "anchor": 0.0, "text_to_old_image": 1.0,
                                                        "image_to_old_text": 1.0, "full_new": 0.0, "uncertainty": 1.0}
    assert resolve_weights(PAIR_TERMS, {}, NO_GALLERY) == {"new_new": 1.0, "anchor": 1.0, "text_to_old_image": 0.0,
                                                           "image_to_old_text": 0.0, "full_new": 0.0,
                                                           "uncertainty": 0.0}
    # a ψ with extra dims (BT²/OCA) trains them by default: else nothing would
    assert resolve_weights(PAIR_TERMS, {}, NO_GALLERY | {"extra_dims"})["full_new"] == 1.0
    assert resolve_weights(PAIR_TERMS, {"anchor": 0.5}, GALLERY)["anchor"] == 0.5  # a given weight wins


@pytest.mark.parametrize("given, provided, message", [
    ({"anchr": 1.0}, NO_GALLERY, r"unknown term\(s\) \['anchr'\]; allowed: new_new, anchor"),
    ({"text_to_old_image": 1.0}, NO_GALLERY, "the term text_to_old_image needs stored old image embeddings"),
    ({"full_new": 1.0}, GALLERY, "the term full_new needs a ψ with extra dimensions .*set full_new=0"),
    ({"new_new": -1.0}, GALLERY, "new_new=-1.0; allowed: a weight >= 0"),
    ({name: 0.0 for name in PAIR_TERMS}, GALLERY, "every term has weight 0"),
])
def test_bad_weights_name_the_term(given, provided, message):
    with pytest.raises(InputError, match=message):
        resolve_weights(PAIR_TERMS, given, provided)


def test_registry_entries_declare_temperature_use_and_old_space():
    assert uses_temperature(PAIR_TERMS, {"anchor": 1.0, "new_new": 0.0}) is False
    assert uses_temperature(PAIR_TERMS, {"anchor": 1.0, "new_new": 1.0}) is True
    assert uses_temperature(TEXT_LOSSES, {"cosine": 1.0}) is False and uses_temperature(TEXT_LOSSES, {"infonce": 1})
    assert [name for name, term in PAIR_TERMS.items() if not term.old_space] == ["new_new", "full_new", "uncertainty"]
    assert uses_temperature(PAIR_TERMS, {"anchor": 1.0, "full_new": 1.0}) is True


def test_a_new_term_is_one_registry_entry(caplog):
    registry: dict[str, LossTerm] = {}
    register(registry, LossTerm("pull", lambda x, scale: cosine_loss(x.a, x.b), "pull pairs together",
                                old_space=True, default=lambda provided: 1.0))
    with pytest.raises(ValueError, match="registered twice"):
        register(registry, registry["pull"])
    with pytest.raises(ValueError, match="which no data provides"):
        register(registry, LossTerm("odd", lambda x, scale: x, "", needs=frozenset({"telepathy"})))
    assert resolve_weights(registry, {}, frozenset()) == {"pull": 1.0}
    register(registry, LossTerm("push", lambda x, scale: x, "a term without an old-space tie"))
    with caplog.at_level("WARNING", logger="xbt.losses"):
        resolve_weights(registry, {"pull": 0.0, "push": 1.0}, frozenset())
    assert "drift out of the old space" in caplog.text


def test_text_loss_kinds_compute_the_paired_losses():
    from types import SimpleNamespace

    a, b = _unit(6, 4, 0), _unit(6, 4, 1)
    pairs = SimpleNamespace(predictions=a, targets=b)
    torch.testing.assert_close(TEXT_LOSSES["infonce"].compute(pairs, 10.0), info_nce(a, b, 10.0))
    torch.testing.assert_close(TEXT_LOSSES["cosine"].compute(pairs, 10.0), cosine_loss(a, b))
    torch.testing.assert_close(TEXT_LOSSES["mse"].compute(pairs, 10.0), mse_loss(a, b))


def test_full_new_is_contrastive_on_the_full_vectors_not_their_compatible_part():
    from types import SimpleNamespace

    full_image, full_text = _unit(6, 5, 2), _unit(6, 5, 3)
    inputs = SimpleNamespace(image=_unit(6, 3, 4), text=_unit(6, 3, 5), full_image=full_image, full_text=full_text)
    torch.testing.assert_close(PAIR_TERMS["full_new"].compute(inputs, 10.0), info_nce(full_image, full_text, 10.0))
