"""The paper's baselines: each penalty against values computed by hand, each method in a
short real training run on the digits task with one behavioural property, their keys,
and BSS / RegSL under two data-parallel gloo processes (no Ray)."""
from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import FEW_IL_PAIRS
from smile_ray.config import make_config
from smile_ray.data import TensorTask, build_task
from smile_ray.errors import SmileError
from smile_ray.losses import (
    bss_penalty,
    cotuning_loss,
    cotuning_relationship,
    delta_penalty,
    l2sp_penalty,
    lwf_loss,
    softmax_weighted_loss,
)
from smile_ray.methods import build_method, method_class
from smile_ray.methods.base import last_convs
from smile_ray.methods.delta import ATTENTION_TEMPERATURE, channel_attention
from smile_ray.methods.regsl import project_to_ball
from smile_ray.methods.rifle import reinit_steps
from smile_ray.methods.stochnorm import StochNorm2d
from smile_ray.models import SourceModel, TransferNet, build_source_model
from smile_ray.pretrain import load_source
from smile_ray.recipe import train

BASELINES = ["l2sp", "bss", "lwf", "cotuning", "rifle", "stochnorm", "delta", "regsl"]
SHORT = {"steps": 20, "eval_every": 10, "samples_per_class": 3, **FEW_IL_PAIRS}

# ---------------------------------------------------------------- penalties by hand


def test_l2sp_penalty_by_hand():
    p = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    p0 = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    # 0.5 * ((1 + 4) + (3 - 1)^2) = 0.5 * 9
    loss = l2sp_penalty(p, p0)
    assert loss.item() == pytest.approx(4.5)
    loss.backward()
    assert p[0].grad.tolist() == [1.0, 2.0] and p[1].grad.tolist() == [[2.0]]


def test_bss_penalty_by_hand():
    # singular values of diag(3, 4) are 4 and 3
    f = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    assert bss_penalty(f, 1).item() == pytest.approx(9.0)
    assert bss_penalty(f, 2).item() == pytest.approx(25.0)
    assert bss_penalty(f, 5).item() == pytest.approx(25.0)  # there are only min(B, d) = 2
    # d sigma_min^2 / dF = 2 * sigma_min * u v^T, u = v = e1 for sigma_min = 3
    bss_penalty(f, 1).backward()
    assert torch.allclose(f.grad, torch.tensor([[6.0, 0.0], [0.0, 0.0]]), atol=1e-5)
    # [[1, 1], [1, -1]] has F^T F = 2 I: both singular values sqrt(2)
    assert bss_penalty(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), 1).item() == pytest.approx(2.0)
    # rank one: singular values 2 and 0
    assert bss_penalty(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 1).item() == pytest.approx(0.0, abs=1e-10)
    # B x d with B > d: 3 x 2, singular values 4 and 3 again
    assert bss_penalty(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]]), 1).item() == pytest.approx(9.0)


def test_delta_penalty_by_hand():
    # layer 1: one image, 2 channels, 1 x 2 positions; layer 2: one channel, one position
    fm1 = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]], requires_grad=True)
    fm2 = torch.tensor([[[[5.0]]]])
    ref1, ref2 = torch.zeros(1, 2, 1, 2, requires_grad=True), torch.tensor([[[[2.0]]]])
    # feature-map form: 0.5 * (1 + 4 + 9 + 16) + 0.5 * (5 - 2)^2
    loss = delta_penalty([fm1, fm2], [ref1, ref2])
    assert loss.item() == pytest.approx(15.0 + 4.5)
    loss.backward()
    assert ref1.grad is None and fm1.grad.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    # attention form: 0.5 * sum_c C * a_c * ||.||^2 / (H W)
    # layer 1: 0.5 * (2 * 0.25 * 5 / 2 + 2 * 0.75 * 25 / 2) = 0.5 * (1.25 + 18.75) = 10
    # layer 2: 0.5 * 1 * 1.0 * 9 / 1 = 4.5
    a = [torch.tensor([0.25, 0.75]), torch.tensor([1.0])]
    assert delta_penalty([fm1, fm2], [ref1, ref2], a).item() == pytest.approx(14.5)
    # summed over the batch: two identical images give twice the value
    two = delta_penalty([fm1.detach().repeat(2, 1, 1, 1)], [ref1.detach().repeat(2, 1, 1, 1)], a[:1])
    assert two.item() == pytest.approx(20.0)


def test_cotuning_relationship_and_loss_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8], [0.3, 0.7, 0.0], [0.3, 0.3, 0.4]])
    labels = torch.tensor([0, 1, 0, 1])
    r = cotuning_relationship(probs, labels, 3)
    # class 0: mean of rows 0 and 2; class 1: of rows 1 and 3; class 2 has no image
    expected = torch.tensor([[0.4, 0.6, 0.0], [0.2, 0.2, 0.6], [0.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)
    # uniform source logits: -sum_k R[y, k] * log(1/3) = log 3 for every row summing to 1
    assert cotuning_loss(torch.zeros(2, 3), torch.tensor([0, 1]), r).item() == pytest.approx(math.log(3))
    # softmax([log 2, 0, -inf-ish]) ~ [2/3, 1/3, 0]: row 0 of R gives -(0.4 log 2/3 + 0.6 log 1/3)
    logits = torch.tensor([[math.log(2.0), 0.0, -50.0]], requires_grad=True)
    loss = cotuning_loss(logits, torch.tensor([0]), r)
    assert loss.item() == pytest.approx(-(0.4 * math.log(2 / 3) + 0.6 * math.log(1 / 3)), rel=1e-5)


def test_lwf_loss_by_hand():
    t = 2.0
    # row 0: ref / T = [log 3, 0] -> p = [3/4, 1/4]; logits 0 -> q = [1/2, 1/2]
    # row 1: logits equal ref -> KL 0; batch mean, no T^2
    ref = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]], requires_grad=True)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = lwf_loss(logits, ref, t)
    assert loss.item() == pytest.approx(kl0 / 2, rel=1e-5)
    loss.backward()
    assert ref.grad is None and logits.grad is not None


def test_softmax_weighted_loss_by_hand():
    # losses [0, 2 log 3], T = 2: weights softmax([0, -log 3]) = [3/4, 1/4]
    losses = torch.tensor([0.0, 2 * math.log(3.0)], requires_grad=True)
    loss = softmax_weighted_loss(losses, 2.0)
    assert loss.item() == pytest.approx(0.25 * 2 * math.log(3.0), rel=1e-6)
    loss.backward()
    assert torch.allclose(losses.grad, torch.tensor([0.75, 0.25]))  # the weights, detached


def test_projection_onto_the_ball_by_hand():
    w = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0]), torch.tensor([[0.3, 0.0]])]
    centres = [None, torch.tensor([1.0, -2.0]), None]
    project_to_ball(w, centres, [1.0, 1.5, 1.0])
    assert torch.allclose(w[0], torch.tensor([0.6, 0.8]))  # ||(3, 4)|| = 5 -> radius 1
    assert torch.allclose(w[1], torch.tensor([1.0, -0.5]))  # (0, 3) from the centre -> (0, 1.5)
    assert torch.allclose(w[2], torch.tensor([[0.3, 0.0]]))  # inside: unchanged


def test_rifle_schedule_by_hand():
    assert reinit_steps(20, 3) == [5, 10, 15]
    assert reinit_steps(300, 3) == [75, 150, 225]
    assert reinit_steps(300, 0) == []
    assert reinit_steps(2, 3) == [1]  # round(0.5) = 0 and round(1.5) = 2 fall outside [1, 2)


def test_stochnorm_layer_by_hand():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.5, -1.0]))
        bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    x = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]])  # (2, 2, 1, 1)
    eps = bn.eps
    # p = 0: the running statistics as they were: channel 0 (x - 1) / 2 * 2 + 0.5, channel 1 x - 1
    sn = StochNorm2d.from_batchnorm(bn, p=0.0, generator=torch.Generator())
    running = sn(x)
    scale0, scale1 = 2 / math.sqrt(4 + eps), 1 / math.sqrt(1 + eps)
    assert torch.allclose(running[:, 0].flatten(), torch.tensor([0.0, 2.0]) * scale0 + 0.5)
    assert torch.allclose(running[:, 1].flatten(), torch.tensor([2.0, 4.0]) * scale1 - 1.0)
    # ...and the running statistics were updated as BatchNorm updates them
    assert torch.allclose(sn.running_mean, 0.9 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([2.0, 3.0]))
    # p = 1: the batch statistics: each channel's two values are -1 and +1 standard deviations
    sn = StochNorm2d.from_batchnorm(bn, p=1.0, generator=torch.Generator())
    batch = sn(x)
    assert torch.allclose(batch[:, 0].flatten(), torch.tensor([-1.0, 1.0]) * 2 + 0.5, atol=1e-4)
    assert torch.allclose(batch[:, 1].flatten(), torch.tensor([-1.0, 1.0]) - 1.0, atol=1e-4)
    # evaluation is plain BatchNorm
    sn = StochNorm2d.from_batchnorm(bn, p=0.5, generator=torch.Generator()).eval()
    assert torch.equal(sn(x), bn.eval()(x))


def test_delta_layers_are_the_published_ones_for_resnet50():
    body = build_source_model("resnet50", 10).body
    assert last_convs(body) == ["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3", "layer4.2.conv3"]
    assert last_convs(build_source_model("digits_cnn", 5).body) == ["conv1", "conv2", "conv3"]


def test_channel_attention_equals_zeroing_each_filter():
    """The batched measurement against the definition: one forward per zeroed filter
    (convolutions with biases, so a zeroed filter leaves its bias)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1)))
    net = TransferNet(SourceModel(body, nn.Linear(5, 3), 1), 3, source_head=False)
    with torch.no_grad():
        net.body[1].running_mean.uniform_(-0.5, 0.5)
        net.body[1].running_var.uniform_(0.5, 2.0)
    layers = ["3.2"]  # the only container stage's last convolution
    assert last_convs(net.body) == layers
    layers = ["0", "3.2"]
    batches = [(torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))) for _ in range(2)]
    got = channel_attention(net, layers, batches)
    net.eval()
    with torch.no_grad():
        for layer, weights in zip(layers, got):
            conv = net.body.get_submodule(layer)
            rise = torch.zeros(conv.out_channels)
            for x, y in batches:
                base = nn.functional.cross_entropy(net(x).logits, y)
                for c in range(conv.out_channels):
                    saved = conv.weight[c].clone()
                    conv.weight[c] = 0.0
                    rise[c] += nn.functional.cross_entropy(net(x).logits, y) - base
                    conv.weight[c] = saved
            rise /= len(batches)
            want = torch.softmax((rise - rise.mean()) / rise.std(unbiased=False) / ATTENTION_TEMPERATURE, 0)
            torch.testing.assert_close(weights, want, rtol=1e-4, atol=1e-6)
            assert weights.sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- config and keys


OWN_KEYS = {
    "l2sp": {"l2sp_weight"},
    "bss": {"bss_weight", "bss_k"},
    "lwf": {"lwf_weight", "lwf_temperature", "lwf_train_source_head"},
    "cotuning": {"cotuning_weight"},
    "rifle": {"rifle_reinits"},
    "stochnorm": {"stochnorm_prob"},
    "delta": {"delta_weight", "delta_variant"},
    # by default the constraints alone (the public code's clean-label script)
    "regsl": {"regsl_self_labelling", "regsl_radius", "regsl_gamma", "regsl_head_radius"},
}
REGSL_SELF_LABELLING_KEYS = {"regsl_relabel_threshold", "regsl_temperature", "regsl_relabel_start_fraction",
                             "regsl_reweight_start_fraction"}


def test_defaults_are_the_published_ones():
    c = make_config()
    assert (c.l2sp_weight, c.bss_weight, c.bss_k) == (0.01, 0.001, 1)
    assert (c.delta_weight, c.delta_variant, c.cotuning_weight) == (0.01, "attention", 2.3)
    assert (c.rifle_reinits, c.stochnorm_prob, c.lwf_weight, c.lwf_temperature) == (3, 0.5, 4.0, 3.0)
    assert (c.regsl_radius, c.regsl_gamma, c.regsl_head_radius) == (7.8, 1.0, 14.08)
    assert (c.regsl_relabel_threshold, c.regsl_temperature) == (0.9, 2.0)
    assert (c.regsl_relabel_start_fraction, c.regsl_reweight_start_fraction) == pytest.approx((9 / 30, 4 / 30))


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_reads_its_own_keys_and_the_head_l2(name):
    cls = method_class(name)
    cfg = make_config({"method": name})
    assert cls.used_keys(cfg) == OWN_KEYS[name] | {"head_l2_weight"}
    assert cls.unused_keys(cfg) == cls.METHOD_KEYS - OWN_KEYS[name] - {"head_l2_weight"}
    assert "head_l2_weight" in cls.unused_keys(cfg.replace(head_l2=False))
    assert OWN_KEYS[name] <= cls.METHOD_KEYS
    for other in BASELINES:
        if other != name:
            assert OWN_KEYS[other] <= cls.unused_keys(cfg)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"l2sp_weight": -0.1}, "l2sp_weight=-0.1 is out of range"),
        ({"bss_weight": -1}, "bss_weight=-1.0 is out of range"),
        ({"bss_k": 0}, "bss_k=0 is out of range"),
        ({"bss_k": 1.5}, "bss_k=1.5 is not a valid int"),
        ({"delta_weight": -1}, "delta_weight"),
        ({"delta_variant": "channels"}, "delta_variant='channels' is out of range (attention or feature_map)"),
        ({"cotuning_weight": -2.3}, "cotuning_weight"),
        ({"rifle_reinits": -1}, "rifle_reinits=-1 is out of range"),
        ({"stochnorm_prob": 1.5}, "stochnorm_prob=1.5 is out of range"),
        ({"lwf_weight": -4}, "lwf_weight"),
        ({"lwf_temperature": 0}, "lwf_temperature=0.0 is out of range"),
        ({"regsl_radius": 0}, "regsl_radius=0.0 is out of range"),
        ({"regsl_gamma": -1}, "regsl_gamma"),
        ({"regsl_head_radius": 0}, "regsl_head_radius"),
        ({"regsl_relabel_threshold": 1.1}, "regsl_relabel_threshold=1.1 is out of range"),
        ({"regsl_temperature": 0}, "regsl_temperature"),
        ({"regsl_relabel_start_fraction": 2}, "regsl_relabel_start_fraction=2.0 is out of range"),
        ({"regsl_reweight_start_fraction": -0.1}, "regsl_reweight_start_fraction"),
    ],
)
def test_bad_baseline_values_name_the_key(values, fragment):
    with pytest.raises(SmileError) as e:
        make_config(values)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- methods on their own


def attached(name, values=None, task=None):
    cfg = make_config({"method": name, **(values or {})})
    torch.manual_seed(0)
    source = build_source_model("digits_cnn", 5)
    method = build_method(cfg)
    torch.manual_seed(1)
    model = TransferNet(source, 5, source_head=method.uses_source_head)
    method.attach(model, source, task=task)
    return source, model, method


def test_rifle_reinitialises_the_head_at_the_scheduled_steps_only():
    _, model, rifle = attached("rifle", {"steps": 20, "rifle_reinits": 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 5, (6,))
    fresh_heads = []
    for step in range(20):
        loss, _ = rifle.loss(model, x, y, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = [p.detach().clone() for p in model.classifier.parameters()]
        rifle.after_step(model, step, opt)
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.classifier.parameters()))
        assert changed == (step + 1 in (5, 10, 15)), step  # never in the final stretch (steps 15-19)
        if changed:
            fresh_heads.append(model.classifier.weight.detach().clone())
            # nn.Linear's default init (|w| <= 1/sqrt(fan_in)); the head's momentum is gone, the body's kept
            assert model.classifier.weight.abs().max() <= 1 / math.sqrt(model.classifier.in_features)
            # zeroed in place, not popped: torch's fused SGD needs every buffer in its list
            assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0 for p in model.classifier.parameters())
            assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) > 0 for p in model.body.parameters())
    assert len(fresh_heads) == 3 and not torch.equal(fresh_heads[0], fresh_heads[1])
    # keyed by (seed, step): another process draws the same head at the same step
    _, other, rifle2 = attached("rifle", {"steps": 20, "rifle_reinits": 3})
    rifle2.after_step(other, 14)
    assert torch.equal(other.classifier.weight, fresh_heads[2])


def test_stochnorm_replaces_every_batchnorm_and_draws_per_step():
    _, model, method = attached("stochnorm")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(isinstance(m, StochNorm2d) for m in norms)
    assert method.info()["replaced_batchnorms"] == 3
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    state = copy.deepcopy(model.state_dict())  # each forward updates the running statistics
    losses = []
    for step in (4, 4, 5):
        model.load_state_dict(state)
        losses.append(method.loss(model, x, y, step)[0].item())
    assert losses[0] == losses[1] and losses[2] != losses[0]  # switches keyed by the step


def test_regsl_is_the_constraints_alone_unless_self_labelling_is_on():
    cfg = make_config({"method": "regsl", "steps": 30})
    assert not cfg.regsl_self_labelling  # the clean-label script's RegSL
    regsl = build_method(cfg)
    assert (regsl.relabel_start, regsl.reweight_start) == (30, 30)  # never inside the run
    assert REGSL_SELF_LABELLING_KEYS <= method_class("regsl").unused_keys(cfg)
    on = cfg.replace(regsl_self_labelling=True)
    assert (build_method(on).relabel_start, build_method(on).reweight_start) == (9, 4)  # epochs 10 and 5 of 30
    assert not REGSL_SELF_LABELLING_KEYS & method_class("regsl").unused_keys(on)
    # at the last step, the default's loss is the plain CE of the given labels, however confident the model
    task = tiny_task()
    _, model, regsl = attached("regsl", {"steps": 30, "batch_size": 4, "regsl_relabel_threshold": 0.0}, task=task)
    x, y = task.train_batch(29, 4)
    loss, parts = regsl.loss(model, x, y, 29)
    torch.testing.assert_close(parts["cls"], nn.functional.cross_entropy(model(x).logits, y))
    assert torch.equal(regsl.labels, task.splits["train"][1]) and regsl.info()["relabelled"] == 0


def test_lwf_source_head_is_frozen_out_of_the_optimiser_and_its_weight_decay(cache_dir, tmp_path):
    from smile_ray.recipe import setup, train_step

    prep_cache = tmp_path / "cache"  # its own: the module's runs must compute their preparations afresh
    prep_cache.mkdir()
    for f in cache_dir.glob("source-*"):
        shutil.copy(f, prep_cache / f.name)
    values = {**SHORT, "method": "lwf", "weight_decay": 0.1, "lr": 0.1}
    run = setup(make_config(values), prep_cache, log=lambda msg: None)
    net = run.model
    assert not any(p.requires_grad for p in net.source_head.parameters())
    in_optimiser = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not {id(p) for p in net.source_head.parameters()} & in_optimiser
    assert {id(p) for p in net.classifier.parameters()} <= in_optimiser
    source_fc = copy.deepcopy(net.source_head.state_dict())
    body_before = copy.deepcopy(net.body.state_dict())
    for step in range(3):
        x, y = run.task.train_batch(step, run.config.batch_size)
        train_step(run, step, x, y)
    for k, v in net.source_head.state_dict().items():  # no update, no weight decay
        assert torch.equal(v, source_fc[k])
    assert any(not torch.equal(v, body_before[k]) for k, v in net.body.state_dict().items())
    # the head L2 covers the trained target head alone
    x, y = run.task.train_batch(3, run.config.batch_size)
    _, parts = run.method.loss(net, x, y, 3)
    torch.testing.assert_close(parts["head"], 0.5 * sum(p.pow(2).sum() for p in net.classifier.parameters()))
    # lwf_train_source_head=true: trained with the rest, as before issue 35
    run = setup(make_config({**values, "lwf_train_source_head": True}), prep_cache, log=lambda msg: None)
    before = copy.deepcopy(run.model.source_head.state_dict())
    x, y = run.task.train_batch(0, run.config.batch_size)
    train_step(run, 0, x, y)
    assert not torch.equal(run.model.source_head.weight, before["weight"])


def tiny_task(n=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)
    return TensorTask({"train": (x, y), "val": (x, y), "test": (x, y)}, 5, seed)


def test_regsl_relabels_only_confident_other_classes():
    task = tiny_task()
    values = {"batch_size": 4, "steps": 10, "regsl_relabel_threshold": 0.9}
    _, model, regsl = attached("regsl", values, task=task)
    idx = task.train_indices(3, 4)
    stored = task.splits["train"][1][idx]
    other = (stored + 1) % 5
    logits = torch.full((4, 5), -10.0)
    logits[0, other[0]] = 10.0  # confident, another class: relabelled
    logits[1, stored[1]] = 10.0  # confident, own class: kept
    logits[2, other[2]] = 1.0  # another class, not confident (softmax < 0.9): kept
    logits[2, stored[2]] = 0.0
    logits[3, other[3]] = 10.0  # confident, another class: relabelled
    regsl.relabel(logits, 3)
    assert regsl.labels[idx].tolist() == [other[0].item(), stored[1].item(), stored[2].item(), other[3].item()]
    assert regsl.info()["relabelled"] == 2


# ---------------------------------------------------------------- short real runs


@pytest.fixture(scope="module")
def prep_cache(cache_dir, tmp_path_factory):
    """A cache holding the pre-trained source model and no preparation yet."""
    path = tmp_path_factory.mktemp("baselines-cache")
    for f in cache_dir.glob("source-*"):
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def runs(prep_cache, tmp_path_factory):
    """Each baseline trained once with the short digits config: output folder and metrics."""
    out = {}
    for name in BASELINES:
        folder = tmp_path_factory.mktemp(f"run-{name}")
        train(make_config({**SHORT, "method": name}), folder, cache_dir=prep_cache, log=lambda msg: None)
        out[name] = (folder, json.loads((folder / "metrics.json").read_text()))
    return out


@pytest.mark.parametrize("name", BASELINES)
def test_a_short_run_is_finite_and_records_the_method(runs, name):
    _, m = runs[name]
    assert m["method"] == name and m["steps"] == 20 and [h["step"] for h in m["history"]] == [10, 20]
    numbers = [m["val_acc"], m["test_acc"], m["test_ece"], m["test_nll"]] + [h["train_loss"] for h in m["history"]]
    assert all(math.isfinite(v) for v in numbers)
    assert 0 <= m["test_acc"] <= 1 and isinstance(m["method_info"], dict)


def source_and_task(cache_dir, values=None):
    cfg = make_config({**SHORT, **(values or {})})
    source, _ = load_source(cfg, cache_dir, log=lambda msg: None)
    return source.eval(), build_task(cfg)


def trained(folder, source, source_head=False) -> TransferNet:
    net = TransferNet(source, 5, source_head=source_head)
    net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return net.eval()


def body_distance(net, source):
    return math.sqrt(sum((p - q).pow(2).sum().item() for p, q in zip(net.body.parameters(), source.body.parameters())))


def test_l2sp_with_a_huge_weight_keeps_the_backbone_at_its_start(runs, prep_cache, tmp_path):
    source, _ = source_and_task(prep_cache)
    l2 = trained(runs["l2sp"][0], source)  # the published weight: near plain fine-tuning here
    train(make_config({**SHORT, "method": "l2sp", "l2sp_weight": 50.0}), tmp_path, cache_dir=prep_cache,
          log=lambda msg: None)
    held = trained(tmp_path, source)
    assert body_distance(held, source) < 0.1 * body_distance(l2, source)


def test_bss_shrinks_the_smallest_singular_values_of_the_features(prep_cache, tmp_path):
    # 10 images per class, so that a batch of 48 holds distinct images (with 3 per class
    # its feature matrix is nearly rank 15 and its smallest singular values nearly 0)
    values = {**SHORT, "samples_per_class": 10}
    source, task = source_and_task(prep_cache, values)
    x = task.splits["train"][0]
    smallest = {}
    for name, extra in (("l2", {}), ("bss", {"bss_weight": 1.0, "bss_k": 8})):
        train(make_config({**values, "method": name, **extra}), tmp_path / name, cache_dir=prep_cache,
              log=lambda msg: None)
        with torch.no_grad():
            features = trained(tmp_path / name, source)(x).fmap.mean(dim=(2, 3))
        smallest[name] = torch.linalg.svdvals(features)[-8:].pow(2).sum().item()
    assert smallest["bss"] < 0.75 * smallest["l2"]


@pytest.mark.parametrize("name, prepared", [("lwf", "lwf_source_logits"), ("cotuning", "cotuning_relationship"),
                                            ("delta", "delta_channel_attention")])
def test_preparations_are_computed_once_cached_and_recorded(runs, prep_cache, tmp_path, name, prepared):
    first = runs[name][1]["method_info"]["preparation"][prepared]
    assert first["cached"] is False and first["seconds"] >= 0 and first["computed_seconds"] >= 0
    train(make_config({**SHORT, "method": name, "steps": 2, "eval_every": 1}), tmp_path, cache_dir=prep_cache,
          log=lambda msg: None)
    again = json.loads((tmp_path / "metrics.json").read_text())["method_info"]["preparation"][prepared]
    assert again["cached"] is True and again["file"] == first["file"]
    assert again["computed_seconds"] == pytest.approx(first["computed_seconds"])
    saved = torch.load(first["file"], weights_only=True)
    source, task = source_and_task(prep_cache)
    x, y = task.splits["train"]
    if name == "lwf":  # the pre-trained network's logits of every (un-augmented) training image
        with torch.no_grad():
            torch.testing.assert_close(saved["logits"], source(x)[1])
    elif name == "cotuning":  # row c: the mean source prediction over class c's images
        with torch.no_grad():
            probs = torch.softmax(source(x)[1], dim=1)
        for c in range(5):
            torch.testing.assert_close(saved["relationship"][c], probs[y == c].mean(0))
    else:  # one softmax weight per channel of each stage's last convolution
        assert {k: v.shape for k, v in saved.items()} == {"conv1": (32,), "conv2": (64,), "conv3": (128,)}
        assert all(v.sum().item() == pytest.approx(1.0) and (v > 0).all() for v in saved.values())


def test_delta_feature_map_variant_needs_no_preparation(prep_cache, tmp_path):
    m = train(make_config({**SHORT, "method": "delta", "delta_variant": "feature_map", "steps": 4, "eval_every": 2}),
              tmp_path, cache_dir=prep_cache, log=lambda msg: None)
    assert "preparation" not in m["method_info"] and math.isfinite(m["history"][-1]["train_loss"])


def test_rifle_run_records_its_schedule(runs):
    assert runs["rifle"][1]["method_info"]["reinit_steps"] == [5, 10, 15]


def test_stochnorm_model_evaluates_as_plain_batchnorm(runs, prep_cache):
    folder, m = runs["stochnorm"]
    source, task = source_and_task(prep_cache)
    net = trained(folder, source)  # a plain TransferNet: plain BatchNorm
    assert not any(isinstance(mod, StochNorm2d) for mod in net.modules())
    with torch.no_grad():
        logits = torch.cat([net(x).logits for x, _ in task.eval_batches("val")])
    acc = (logits.argmax(1) == task.splits["val"][1]).float().mean().item()
    assert acc == pytest.approx(m["val_acc"], abs=1e-6)


def test_regsl_projection_keeps_every_weight_within_its_radius(prep_cache, tmp_path):
    values = {**SHORT, "method": "regsl", "regsl_radius": 0.02, "regsl_gamma": 2.0, "regsl_head_radius": 0.5}
    m = train(make_config(values), tmp_path, cache_dir=prep_cache, log=lambda msg: None)
    source, _ = source_and_task(prep_cache)
    net = trained(tmp_path, source)
    start = dict(source.body.named_parameters())
    radii = m["method_info"]["constrained"]
    assert radii == {"conv1.weight": 0.02, "conv2.weight": 0.02, "conv3.weight": 0.04, "classifier.weight": 0.5}
    ratios = []
    for name, w in net.body.named_parameters():
        if name in radii:
            ratios.append((w - start[name]).norm().item() / radii[name])
    ratios.append(net.classifier.weight.norm().item() / radii["classifier.weight"])
    assert max(ratios) <= 1 + 1e-5
    assert max(ratios) > 0.99  # the constraint was active, not merely slack


# ---------------------------------------------------------------- data parallel (gloo, no Ray)

B, WORLD, STEP = 8, 2, 3
#: config, the loss part to compare, and whether that part is a global-batch quantity
#: (the same on every rank) rather than a per-rank mean (which only DDP's averaging makes global)
DDP_CASES = {
    "bss": ({"method": "bss", "batch_size": B, "bss_weight": 1.0, "bss_k": 3}, "bss", True),
    # reweighting and relabelling on from the start, every mismatch relabelled
    "regsl": ({"method": "regsl", "batch_size": B, "steps": 10, "regsl_self_labelling": True,
               "regsl_reweight_start_fraction": 0.0,
               "regsl_relabel_start_fraction": 0.0, "regsl_relabel_threshold": 0.0}, "cls", True),
    "delta": ({"method": "delta", "batch_size": B, "delta_variant": "feature_map", "delta_weight": 0.1}, "delta", True),
    "lwf": ({"method": "lwf", "batch_size": B}, "lwf", False),
    "cotuning": ({"method": "cotuning", "batch_size": B}, "cotuning", False),
}


def ddp_setup(values, rank, world_size):
    task = tiny_task()
    method = build_method(make_config(values), rank=rank, world_size=world_size)
    torch.manual_seed(0)
    source = build_source_model("digits_cnn", 5)
    model = TransferNet(source, 5, source_head=method.uses_source_head)
    # eval mode: BatchNorm with running statistics treats images independently, so the
    # shards' forwards are exactly the global batch's (train-mode statistics are per rank)
    model.eval()
    method.attach(model, source, task=task)  # preparations go to the test's own cache
    with torch.no_grad():  # a student away from the pre-trained network (DELTA's distance is 0 there)
        g = torch.Generator().manual_seed(2)
        for p in model.body.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return task, method, model


def ddp_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = {}
        for name, (values, part, _) in DDP_CASES.items():
            task, method, model = ddp_setup(values, rank, WORLD)
            net = nn.parallel.DistributedDataParallel(model)
            x, y = task.train_batch(STEP, B, rank, WORLD)
            loss, parts = method.loss(net, x, y, STEP)
            loss.backward()
            with torch.no_grad():
                own = bss_penalty(model(x).fmap.mean(dim=(2, 3)), 3).item()  # this shard alone
            labels = method.labels.clone() if name == "regsl" else None
            out[name] = (parts[part].item(), [p.grad.clone() for p in net.parameters() if p.requires_grad], own, labels)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_baselines_over_two_workers_equal_one_process(tmp_path):
    """N gloo workers on shards of a global batch get the single-process gradient after
    DDP's averaging; the batch-level terms (BSS's singular values, RegSL's batch softmax
    and relabelling, DELTA's batch sum) hold the single-process value on every rank."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(ddp_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
        got = dict(results)
    for name, (values, part, is_global) in DDP_CASES.items():
        task, method, model = ddp_setup(values, 0, 1)
        x, y = task.train_batch(STEP, B)
        loss, parts = method.loss(model, x, y, STEP)
        loss.backward()
        single = parts[part].item()
        want = [p.grad for p in model.parameters() if p.requires_grad]
        for rank in range(WORLD):
            value, grads, own, labels = got[rank][name]
            if is_global:
                assert value == pytest.approx(single, rel=1e-5), name
            for g, w in zip(grads, want):  # DDP averaged the ranks' gradients
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
            if name == "bss":  # a shard's own singular values are another quantity
                assert abs(own - single) > 0.05 * single
            if name == "regsl":  # every rank relabelled the whole global batch, as one process did
                assert torch.equal(labels, method.labels)
                assert not torch.equal(method.labels, task.splits["train"][1])
