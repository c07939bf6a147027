"""FastFill's uncertainty head: it learns which stored vectors predict their better embedding worst, and orders
backfilling by that, in `xbt plan` and in the evaluation's curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xbt.backfill import backfill_curve, order_items
from xbt.cli import main as cli
from xbt.errors import FingerprintMismatchError, InputError
from xbt.losses import gaussian_nll
from xbt.retrieval import Labeled
from xbt.uncertainty import UncertaintyHead, load_head

DIM = 16


def _noisy_half(seed: int = 0, count: int = 2000) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Stored vectors, their "better" vectors, and which items are noisy: the better vector of an item with
    a positive first coordinate is far from what its stored vector says (std 0.6), of the others close (0.05)."""
    generator = torch.Generator().manual_seed(seed)
    stored = F.normalize(torch.randn(count, DIM, generator=generator), dim=-1)
    noisy = stored[:, 0] > 0
    std = torch.where(noisy, 0.6, 0.05)[:, None]
    better = F.normalize(stored + std * torch.randn(count, DIM, generator=generator), dim=-1)
    return stored, better, noisy.numpy()


def _train(head: UncertaintyHead, stored: torch.Tensor, better: torch.Tensor, steps: int = 300) -> list[float]:
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = gaussian_nll(*head(stored), better)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive item scores above a negative one (ROC AUC, by ranks)."""
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_the_head_learns_which_stored_vectors_predict_their_better_vector_worst():
    stored, better, noisy = _noisy_half()
    torch.manual_seed(0)
    head = UncertaintyHead(DIM)
    untrained = _auc(head.log_variance(stored.numpy()), noisy)
    losses = _train(head, stored, better)
    trained = _auc(head.log_variance(stored.numpy()), noisy)
    assert losses[-1] < losses[0] - 1.0  # the NLL falls by more than a nat per dimension
    assert abs(untrained - 0.5) < 0.15 and trained > 0.95
    # The ordering puts the noisy half first: nearly all of the first half of the order is noisy.
    order = order_items("uncertainty", stored.numpy(), head=head)
    assert noisy[order[: noisy.sum()]].mean() > 0.9


def test_uncertainty_first_backfill_beats_random_where_the_old_vectors_of_some_items_are_bad():
    """A gallery whose old vectors are good for half the items and scrambled for the other half: the head,
    trained on stored vs re-embedded vectors of a separate training set, finds the scrambled ones from their
    stored vectors alone, and re-embedding them first lifts Recall@1 faster than a random order."""
    generator = torch.Generator().manual_seed(1)

    def gallery(count: int):
        truth = F.normalize(torch.randn(count, DIM, generator=generator), dim=-1)
        bad = torch.arange(count) % 2 == 0
        # the old model collapses its bad items towards one region (where it is confused), the good ones it keeps
        collapsed = F.normalize(0.3 * truth + torch.tensor([3.0] + [0.0] * (DIM - 1)), dim=-1)
        old = torch.where(bad[:, None], collapsed, truth)
        return truth, old, bad

    train_truth, train_old, _ = gallery(2000)
    torch.manual_seed(0)
    head = UncertaintyHead(DIM, space_id="space-old")
    _train(head, train_old, train_truth)
    truth, old, bad = gallery(400)
    queries = Labeled(F.normalize(truth + 0.1 * torch.randn(400, DIM, generator=generator), dim=-1).numpy(),
                      np.arange(400), "space-old")
    stored = Labeled(old.numpy(), np.arange(400), "space-old")
    reembedded = Labeled(truth.numpy(), np.arange(400), "space-old")
    curves = {name: backfill_curve(queries, stored, reembedded, order=order_items(name, old.numpy(), head=head),
                                   fractions=(0.0, 0.5, 1.0), ks=(1,))["recall"][1]
              for name in ("uncertainty", "random")}
    assert bad.numpy()[order_items("uncertainty", old.numpy(), head=head)[:200]].mean() > 0.95
    assert curves["uncertainty"][0] == curves["random"][0] and curves["uncertainty"][2] == curves["random"][2]
    assert curves["uncertainty"][1] > curves["random"][1] + 15  # half re-embedded: every bad item vs half of them


def test_the_uncertainty_ordering_without_a_head_is_refused():
    with pytest.raises(InputError, match="uncertainty head"):
        order_items("uncertainty", np.eye(3, dtype=np.float32))


@pytest.fixture
def plan_inputs(tmp_path):
    stored, better, noisy = _noisy_half(count=300)
    torch.manual_seed(0)
    head = UncertaintyHead(DIM, space_id="space-old")
    _train(head, stored, better, steps=100)
    head.save_pretrained(tmp_path / "adapter" / "uncertainty")
    np.save(tmp_path / "gallery.npy", stored.numpy())
    return tmp_path, head, stored.numpy()


def test_xbt_plan_orders_by_the_adapters_head(plan_inputs, capsys):
    root, head, stored = plan_inputs
    code = cli(["plan", "--gallery", str(root / "gallery.npy"), "--ordering", "uncertainty",
                "--adapter", str(root / "adapter"), "--output_dir", str(root / "plan")])
    assert code == 0
    written = [int(line) for line in (root / "plan" / "order.txt").read_text().split()]
    assert written == list(np.argsort(-head.log_variance(stored).astype(np.float64), kind="stable"))
    assert json.loads((root / "plan" / "plan.json").read_text())["adapter"] == str(root / "adapter")
    assert load_head(root / "adapter").space_id == "space-old"


@pytest.mark.parametrize("extra, message", [
    ([], "give --adapter DIR"),  # the uncertainty ordering without an adapter
    (["--adapter", "{root}/nowhere"], "has no uncertainty head"),
])
def test_xbt_plan_refuses_the_uncertainty_ordering_without_a_head(plan_inputs, capsys, extra, message):
    root, _, _ = plan_inputs
    code = cli(["plan", "--gallery", str(root / "gallery.npy"), "--ordering", "uncertainty",
                *[part.format(root=root) for part in extra], "--output_dir", str(root / "plan")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("xbt plan: error:") and message in error[0]
    assert not (root / "plan" / "order.txt").exists()


def test_a_head_refuses_a_gallery_of_another_space(plan_inputs):
    _, head, stored = plan_inputs
    with pytest.raises(FingerprintMismatchError, match="space-other.*space-old"):
        head.check_space("space-other")
