"""Each loss against a value computed by hand on tiny tensors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from smile_ray.losses import (
    feature_mixup_loss,
    head_l2,
    l2sp_penalty,
    mix,
    mixup_cross_entropy,
    sample_lambda,
    source_label_loss,
)

PERM = torch.tensor([1, 0])
LAM = 0.75


class FixedBeta:
    def __init__(self, value):
        self.value = value

    def beta(self, a, b):
        return self.value


def test_lambda_is_folded_towards_the_original_sample():
    assert sample_lambda(0.2, FixedBeta(0.3)) == pytest.approx(0.7)
    assert sample_lambda(0.2, FixedBeta(0.8)) == pytest.approx(0.8)
    g = np.random.default_rng(0)
    draws = [sample_lambda(0.2, g) for _ in range(200)]
    assert min(draws) >= 0.5 and max(draws) <= 1.0
    assert len(set(draws)) > 100  # really random, not a constant


def test_mix_inputs():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    assert torch.equal(mix(x, PERM, LAM), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_mixup_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    # CE(logits, y): row0 -log(e^2/(e^2+1)), row1 -log(e/(1+e))
    ce_y = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    # y[perm] = [1, 0]: row0 -log(1/(e^2+1)), row1 -log(1/(1+e))
    ce_perm = (math.log(1 + math.exp(2)) + math.log(1 + math.exp(1))) / 2
    expected = LAM * ce_y + (1 - LAM) * ce_perm
    assert mixup_cross_entropy(logits, y, PERM, LAM).item() == pytest.approx(expected, rel=1e-6)


def test_feature_mixup_loss_by_hand_and_teacher_gets_no_gradient():
    t = torch.arange(1.0, 9.0).reshape(2, 1, 2, 2).requires_grad_(True)
    fmap = torch.ones(2, 1, 2, 2, requires_grad=True)
    # mixed teacher: 0.75*[1,2,3,4] + 0.25*[5,6,7,8] = [2,3,4,5]; other row [4,5,6,7]
    # minus ones: [1,2,3,4] and [3,4,5,6]; squares sum to 116; H*W = 4
    loss = feature_mixup_loss(fmap, t, PERM, LAM)
    assert loss.item() == pytest.approx(math.sqrt(116) / 4)
    loss.backward()
    assert t.grad is None
    diff = torch.tensor([1.0, 2, 3, 4, 3, 4, 5, 6]).reshape(2, 1, 2, 2)
    assert torch.allclose(fmap.grad, -diff / (math.sqrt(116) * 4))


def test_source_label_loss_by_hand_and_teacher_gets_no_gradient():
    aux = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)  # q = [.5,.5], [.75,.25]
    p = torch.tensor([[1.0, 0.0], [0.2, 0.8]], requires_grad=True)
    # lam * mean_b(-sum p log q) + (1 - lam) * mean_b(-sum p[perm] log q)
    own = (-(math.log(0.5)) + -(0.2 * math.log(0.75) + 0.8 * math.log(0.25))) / 2
    other = (-(0.2 * math.log(0.5) + 0.8 * math.log(0.5)) + -(math.log(0.75))) / 2
    loss = source_label_loss(aux, p, PERM, LAM)
    assert loss.item() == pytest.approx(LAM * own + (1 - LAM) * other, rel=1e-6)
    loss.backward()
    assert p.grad is None and aux.grad is not None


def test_head_l2_sums_weights_and_biases_of_every_head():
    a, b = nn.Linear(2, 1), nn.Linear(1, 1)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 2.0]]))
        a.bias.fill_(3.0)
        b.weight.fill_(-1.0)
        b.bias.fill_(0.5)
    assert head_l2(a, b).item() == pytest.approx(0.5 * (1 + 4 + 9 + 1 + 0.25))
    assert head_l2(a, None).item() == pytest.approx(0.5 * 14)


def per_tensor_l2sp(params, ref_params):
    """The first version's L2-SP term: autograd through one graph per tensor."""
    return 0.5 * sum((p - p0.detach()).float().pow(2).sum() for p, p0 in zip(params, ref_params, strict=True))


@pytest.mark.parametrize("channels_last", [False, True])
def test_l2sp_penalty_equals_the_per_tensor_formula_and_its_gradient_bit_for_bit(channels_last):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    if channels_last:  # as on CUDA: the references share the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    refs = [(p + 0.01 * torch.randn_like(p)).detach() for p in params]
    params[3].requires_grad_(False)  # a frozen tensor gets no gradient, the others theirs
    grads = []
    for penalty in (l2sp_penalty, per_tensor_l2sp):
        model.zero_grad(set_to_none=True)
        value = penalty(params, refs)
        (0.01 * value).backward()  # the published l2sp_weight as the upstream gradient
        grads.append([p.grad for p in params])
        if penalty is l2sp_penalty:
            new_value = value
    assert new_value.dtype == torch.float32 and new_value.requires_grad
    assert new_value.item() == pytest.approx(value.item(), rel=1e-6)
    exact = 0.5 * sum((p.double() - p0.double()).pow(2).sum() for p, p0 in zip(params, refs)).item()
    assert abs(new_value.item() - exact) <= abs(value.item() - exact) + 1e-7 * exact  # no less accurate
    assert grads[0][3] is None and grads[1][3] is None
    assert all(torch.equal(a, b) and a.stride() == b.stride()
               for a, b in zip(grads[0], grads[1]) if a is not None)
