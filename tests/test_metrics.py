"""The end-of-run analyses: the interpolation loss (paper, Eq. 1) and reliability bins."""
from typing import NamedTuple

import pytest
import torch
from torch import nn

from smile_ray.data import TensorTask
from smile_ray.metrics import (IL_LAMBDAS, expected_calibration_error, il_pairs, interpolation_loss,
                               interpolation_losses, reliability_bins)


def test_interpolation_loss_by_hand():
    # f(x) = x^2 elementwise: each coordinate's gap is -lam (1 - lam) (a - b)^2, here
    # (a - b)^2 = 1 for both coordinates, so ||gap||^2 = 2 lam^2 (1 - lam)^2.
    x1, x2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    expected = sum(2 * (lam * (1 - lam)) ** 2 for lam in IL_LAMBDAS) / 3  # (0.0703125 + 0.125 + 0.0703125) / 3
    assert expected == pytest.approx(0.08854166666)
    assert interpolation_loss(lambda x: x ** 2, x1, x2, IL_LAMBDAS).item() == pytest.approx(expected)
    # two pairs: the mean over pairs; one dict entry per output
    x1b, x2b = torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    out = interpolation_loss(lambda x: {"sq": x ** 2, "lin": 3 * x + 1}, x1b, x2b, [0.5])
    assert out["sq"].item() == pytest.approx(0.125 / 2) and out["lin"].item() == 0.0


def test_interpolation_loss_of_an_affine_map_is_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(-3, 4, (5, 4), generator=g).float(), torch.randint(-3, 4, (4,), generator=g).float()
    x1, x2 = torch.randint(-4, 5, (6, 5), generator=g).float(), torch.randint(-4, 5, (6, 5), generator=g).float()
    assert interpolation_loss(lambda x: x @ a + b, x1, x2, IL_LAMBDAS).item() == 0.0
    assert interpolation_loss(lambda x: torch.relu(x @ a + b), x1, x2, IL_LAMBDAS).item() > 0


class Out(NamedTuple):
    logits: torch.Tensor
    fmap: torch.Tensor
    aux_logits: None


class TinyNet(nn.Module):
    """A TransferNet-like student: a 1x1-convolution body (linear, or with a ReLU), the
    average-pooled feature map, a linear classifier. Small integer weights keep every
    product exact in floating point."""

    def __init__(self, relu: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU() if relu else nn.Identity())
        self.classifier = nn.Linear(3, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def forward(self, x):
        fmap = self.body(x)
        return Out(self.classifier(fmap.mean((2, 3))), fmap, None)


def tiny_task(seed=0):
    g = torch.Generator().manual_seed(1)
    split = lambda n: (torch.randint(-4, 5, (n, 1, 2, 2), generator=g).float(), torch.randint(0, 4, (n,), generator=g))
    return TensorTask({"train": split(40), "val": split(10), "test": split(30)}, num_classes=4, seed=seed)


def identity(x, y):
    return x, y


def test_interpolation_losses_of_a_linear_student_are_zero_and_of_a_relu_one_positive():
    task = tiny_task()
    linear = interpolation_losses(TinyNet(relu=False), task, 0, identity, pairs=50)
    assert {k: linear[k] for k in ("label_il_train", "label_il_test", "feature_il_train", "feature_il_test")} == {
        "label_il_train": 0.0, "label_il_test": 0.0, "feature_il_train": 0.0, "feature_il_test": 0.0}
    assert linear["interpolation"]["pairs"] == 50 and linear["interpolation"]["lambdas"] == list(IL_LAMBDAS)
    model = TinyNet(relu=True).train()
    relu = interpolation_losses(model, task, 0, identity, pairs=50, batch_size=16)
    assert all(relu[k] > 0 for k in ("label_il_train", "label_il_test", "feature_il_train", "feature_il_test"))
    assert model.training  # left as it was found
    # the chunking does not change the value; the same seed gives the same pairs
    again = interpolation_losses(model, task, 0, identity, pairs=50, batch_size=7)
    assert again["label_il_test"] == pytest.approx(relu["label_il_test"], rel=1e-9)
    other = interpolation_losses(model, task, 1, identity, pairs=50)
    assert other["label_il_test"] != relu["label_il_test"]


def test_interpolation_losses_match_the_pure_function_on_the_chosen_pairs():
    task, model = tiny_task(), TinyNet(relu=True).eval()
    i, j = il_pairs(30, 5, "test", 20)
    assert (i != j).all() and i.min() >= 0 and max(i.max(), j.max()) < 30
    x = task.splits["test"][0]
    expected = interpolation_loss(lambda z: model(z).logits, x[i], x[j], IL_LAMBDAS).item()
    got = interpolation_losses(model, task, 5, identity, splits=("test",), pairs=20)
    assert got["label_il_test"] == pytest.approx(expected, rel=1e-9) and "label_il_train" not in got
    assert torch.equal(task.images_at("test", [3, 0, 3]), x[[3, 0, 3]])


def test_reliability_bins_by_hand_and_their_ece():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right)
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]]))
    labels = torch.tensor([0, 1, 1])
    rel = reliability_bins(logits, labels)
    assert rel["bins"] == 15 and sum(rel["count"]) == 3
    b9, b6 = 13, 8  # 0.9 lies in (13/15, 14/15], 0.6 in (8/15, 9/15]
    assert rel["count"][b9] == 2 and rel["count"][b6] == 1
    assert rel["accuracy"][b9] == pytest.approx(0.5) and rel["confidence"][b9] == pytest.approx(0.9)
    assert rel["accuracy"][b6] == pytest.approx(1.0) and rel["confidence"][b6] == pytest.approx(0.6)
    assert rel["accuracy"][0] is None and rel["confidence"][0] is None
    ece = sum(n / 3 * abs(a - c) for n, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"]) if n)
    assert ece == pytest.approx(expected_calibration_error(logits, labels), rel=1e-6)


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins at 0.9 and 0.6
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]]))
    labels = torch.tensor([0, 1, 1])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, rel=1e-5)
