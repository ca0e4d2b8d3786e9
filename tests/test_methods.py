"""Methods: the mean teacher's EMA, the component switches, the plain tail."""
import copy

import pytest
import torch

from smile_ray.config import make_config
from smile_ray.methods import build_method
from smile_ray.models import TransferNet, build_source_model


def make(config, source=None):
    torch.manual_seed(0)
    source = source or build_source_model("digits_cnn", 5)
    method = build_method(config)
    torch.manual_seed(1)
    model = TransferNet(source, 5, source_head=method.uses_source_head)
    method.attach(model, source)
    return source, model, method


def batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_ema_matches_closed_form_only_on_update_steps():
    cfg = make_config({"ema_decay": 0.9, "ema_every": 3})
    source, model, smile = make(cfg)
    theta0 = [p.detach().clone() for p in source.body.parameters()]
    student = list(model.body.parameters())
    expected = [t.clone() for t in theta0]
    updates = 0
    for step in range(9):
        with torch.no_grad():
            for i, p in enumerate(student):
                p.fill_(float(step + i))  # a different student at every step
        smile.after_step(model, step)
        if (step + 1) % 3 == 0:  # steps 2, 5, 8 update
            updates += 1
            expected = [0.9 * e + 0.1 * s.detach() for e, s in zip(expected, student)]
        for got, want in zip(smile.teacher.body.parameters(), expected):
            torch.testing.assert_close(got, want)
    assert updates == 3


def bn_statistics(body):
    """(name, tensor) of every BatchNorm buffer of ``body``."""
    return [(n, b) for n, b in body.named_buffers() if n.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")]


def test_ema_averages_batchnorm_statistics_term_by_term_as_the_reference():
    """Reference ``update_mean_teacher``: every teacher parameter but ``fc.*`` (Paddle's
    BatchNorm ``_mean``/``_variance`` among them) <- d * teacher + (1 - d) * student."""
    cfg = make_config({"ema_decay": 0.9, "ema_every": 2})
    source, model, smile = make(cfg)
    assert cfg.ema_statistics  # the default
    expected = {n: b.clone() for n, b in bn_statistics(source.body)}
    counts = {n: b.clone() for n, b in expected.items() if n.endswith("num_batches_tracked")}
    assert len(counts) == 3 and len(expected) == 9  # digits_cnn: three BatchNorms, three buffers each
    teacher_fc = copy.deepcopy(smile.teacher.fc.state_dict())
    for step in range(6):
        with torch.no_grad():
            for i, (n, b) in enumerate(bn_statistics(model.body)):
                if n.endswith("running_mean"):
                    b.fill_(float(step) - i)
                elif n.endswith("running_var"):
                    b.fill_(1.0 + step + i)
                else:
                    b.fill_(100 + step)  # a count the teacher must not follow
        smile.after_step(model, step)
        student = dict(bn_statistics(model.body))
        if (step + 1) % 2 == 0:
            for n in expected:
                if not n.endswith("num_batches_tracked"):
                    expected[n] = 0.9 * expected[n] + 0.1 * student[n]
        for n, got in bn_statistics(smile.teacher.body):
            want = counts[n] if n.endswith("num_batches_tracked") else expected[n]
            torch.testing.assert_close(got, want, msg=f"{n} after step {step}")
    for k, v in smile.teacher.fc.state_dict().items():  # the teacher's source classifier stays
        torch.testing.assert_close(v, teacher_fc[k])


def test_ema_statistics_off_leaves_batchnorm_statistics_and_source_classifier_alone():
    cfg = make_config({"ema_decay": 0.5, "ema_every": 1, "ema_statistics": False})
    source, model, smile = make(cfg)
    with torch.no_grad():
        for m in model.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(7.0)
                m.running_var.fill_(3.0)
        for p in model.body.parameters():
            p.add_(1.0)
        model.source_head.weight.add_(1.0)
    teacher_fc = copy.deepcopy(smile.teacher.fc.state_dict())
    for step in range(4):
        smile.after_step(model, step)
    for name, buf in smile.teacher.body.named_buffers():
        torch.testing.assert_close(buf, dict(source.body.named_buffers())[name])
    for k, v in smile.teacher.fc.state_dict().items():
        torch.testing.assert_close(v, teacher_fc[k])
    # ...while the parameters did move
    moved = [not torch.equal(t, s) for t, s in zip(smile.teacher.body.parameters(), source.body.parameters())]
    assert all(moved)


def test_ema_decay_horizon_matches_the_reference_total_drift():
    from smile_ray.methods.smile import ema_decay_per_update, teacher_updates

    # the reference: 9,000 steps, the last 1,000 plain, an update every 10: 800 updates
    reference = make_config({"steps": 9000})
    assert teacher_updates(9000, 10, reference.plain_tail_start) == 800
    assert ema_decay_per_update(reference) == 0.999
    assert ema_decay_per_update(reference.replace(ema_decay_horizon=9000)) == pytest.approx(0.999)
    # the 150-step preset: 133 regularised steps, 13 updates
    short = make_config({"steps": 150, "ema_decay_horizon": 9000})
    assert teacher_updates(150, 10, short.plain_tail_start) == 13
    d = ema_decay_per_update(short)
    assert d == pytest.approx(0.999 ** (800 / 13))
    assert d ** 13 == pytest.approx(0.999 ** 800)  # the same share of the pre-trained model kept
    assert 0.93 < d < 0.95  # the "0.94 over 13 updates"
    assert ema_decay_per_update(short.replace(ema_decay_horizon=0)) == 0.999
    # the method applies it, and says so
    _, model, smile = make(short.replace(ema_every=10))
    assert smile.ema_decay == d
    assert smile.info()["ema_decay_per_update"] == d and smile.info()["teacher_updates"] == 13
    theta0 = [t.clone() for t in smile.teacher.body.parameters()]
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(1.0)
    smile.after_step(model, 9)
    for t, t0, s in zip(smile.teacher.body.parameters(), theta0, model.body.parameters()):
        torch.testing.assert_close(t, d * t0 + (1 - d) * s)


def test_ema_decay_horizon_is_checked():
    from smile_ray.errors import SmileError

    with pytest.raises(SmileError, match="ema_decay_horizon"):
        make_config({"ema_decay_horizon": -1})


def test_frozen_teacher_when_mean_teacher_is_off():
    cfg = make_config({"mean_teacher": False, "ema_every": 1})
    source, model, smile = make(cfg)
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(1.0)
    smile.after_step(model, 0)
    for t, s in zip(smile.teacher.body.parameters(), source.body.parameters()):
        assert torch.equal(t, s)


def test_source_label_head_is_initialised_from_the_source_classifier():
    source, model, smile = make(make_config())
    assert torch.equal(model.source_head.weight, source.fc.weight)
    assert torch.equal(model.source_head.bias, source.fc.bias)
    assert model.source_head.weight.data_ptr() != source.fc.weight.data_ptr()


def loss_of(config, step=5):
    # alpha=2 keeps lambda away from 1, where mixing would be indistinguishable from none
    source, model, method = make(config.replace(mixup_alpha=2.0))
    x, y = batch()
    loss, parts = method.loss(model, x, y, step)
    return loss, parts, method


def test_smile_without_teacher_terms_is_mixup():
    off = {"feature_mixup": False, "source_label": False}
    smile, parts, method = loss_of(make_config({"method": "smile", **off}))
    mixup, _, _ = loss_of(make_config({"method": "mixup"}))
    assert method.teacher is None  # no teacher, hence no teacher forward
    assert set(parts) == {"cls", "head"}
    assert smile.item() == mixup.item()
    full, full_parts, _ = loss_of(make_config({"method": "smile"}))
    assert set(full_parts) == {"cls", "feat", "src", "head"}
    assert full.item() != mixup.item()


def test_smile_without_any_mixing_is_l2():
    off = {"feature_mixup": False, "source_label": False, "label_mixup": False}
    smile, _, _ = loss_of(make_config({"method": "smile", **off}))
    l2, _, _ = loss_of(make_config({"method": "l2"}))
    mixup, _, _ = loss_of(make_config({"method": "mixup"}))
    assert smile.item() == l2.item()
    assert l2.item() != mixup.item()


def test_head_l2_switch_removes_the_penalty():
    with_l2, parts, _ = loss_of(make_config({"method": "l2"}))
    without, _, _ = loss_of(make_config({"method": "l2", "head_l2": False}))
    assert with_l2.item() == pytest.approx(without.item() + 1e-4 * parts["head"].item())


def test_plain_tail_is_plain_fine_tuning():
    cfg = {"steps": 90, "source_label": False}  # tail = last 10 steps
    assert make_config(cfg).plain_tail_start == 80
    smile_tail, parts, _ = loss_of(make_config({"method": "smile", **cfg}), step=85)
    l2_tail, _, _ = loss_of(make_config({"method": "l2", **cfg}), step=85)
    assert set(parts) == {"cls", "head"}
    assert smile_tail.item() == l2_tail.item()
    smile_early, _, _ = loss_of(make_config({"method": "smile", **cfg}), step=79)
    assert smile_early.item() != l2_tail.item()
    no_tail, _, _ = loss_of(make_config({"method": "smile", "plain_tail": False, **cfg}), step=85)
    assert no_tail.item() != l2_tail.item()
    # with the source-label head, the tail's head L2 covers both heads (reference)
    _, parts, _ = loss_of(make_config({"method": "smile", "steps": 90}), step=85)
    assert set(parts) == {"cls", "head"}


def test_label_mixup_off_trains_the_classifier_and_the_smile_terms():
    cfg = make_config({"method": "smile", "label_mixup": False})
    source, model, method = make(cfg)
    x, y = batch()
    loss, parts = method.loss(model, x, y, 5)
    assert set(parts) == {"cls", "feat", "src", "head"}
    loss.backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())


def test_source_label_off_has_no_source_head():
    source, model, method = make(make_config({"source_label": False}))
    assert model.source_head is None and method.teacher is not None
    x, y = batch()
    _, parts = method.loss(model, x, y, 5)
    assert set(parts) == {"cls", "feat", "head"}


def test_same_step_gives_same_draw_and_different_steps_differ():
    cfg = make_config({"method": "mixup"})
    m = build_method(cfg)
    x = torch.zeros(16, 1, 4, 4)
    lam1, perm1 = m.draw_mix(x, 7)
    lam2, perm2 = m.draw_mix(x, 7)
    lam3, perm3 = m.draw_mix(x, 8)
    assert lam1 == lam2 and torch.equal(perm1, perm2)
    assert lam1 != lam3 and not torch.equal(perm1, perm3)
    other_rank = build_method(cfg, rank=1)
    lam4, perm4 = other_rank.draw_mix(x, 7)
    assert lam4 == lam1 and not torch.equal(perm4, perm1)  # shared lambda, own permutation


def test_the_teacher_is_not_updated_in_the_plain_tail():
    cfg = make_config({"steps": 90, "ema_every": 1, "ema_decay": 0.5})  # tail = steps 80-89
    source, model, smile = make(cfg)
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(1.0)
    smile.after_step(model, 79)
    before = [t.clone() for t in smile.teacher.body.parameters()]
    assert not all(torch.equal(t, s) for t, s in zip(before, source.body.parameters()))  # step 79 updated
    for step in range(80, 90):
        smile.after_step(model, step)
    assert all(torch.equal(t, b) for t, b in zip(smile.teacher.body.parameters(), before))


def test_label_mixup_off_changes_only_the_label_term():
    """The arm's SMILE terms come from the full method's mixed forward, its running
    BatchNorm statistics see only that forward, and only the CE differs."""
    full_cfg = make_config({"method": "smile", "mixup_alpha": 2.0})
    off_cfg = full_cfg.replace(label_mixup=False)
    x, y = batch()
    results = {}
    for name, cfg in (("full", full_cfg), ("off", off_cfg)):
        _, model, method = make(cfg)
        loss, parts = method.loss(model, x, y, 5)
        stats = [b.clone() for n, b in model.body.named_buffers() if "running" in n]
        results[name] = (parts, stats)
    full_parts, full_stats = results["full"]
    off_parts, off_stats = results["off"]
    assert full_parts["feat"].item() == off_parts["feat"].item()
    assert full_parts["src"].item() == off_parts["src"].item()
    assert full_parts["head"].item() == off_parts["head"].item()
    assert full_parts["cls"].item() != off_parts["cls"].item()
    assert all(torch.equal(a, b) for a, b in zip(full_stats, off_stats))
    # the label term is plain CE of a clean forward (BatchNorm in train mode, batch statistics)
    _, model, method = make(off_cfg)
    torch.testing.assert_close(off_parts["cls"], torch.nn.functional.cross_entropy(model(x).logits, y))


def test_a_method_reads_the_keys_declared_for_its_name():
    """Method.used_keys derives from the config's declarations; only SMILE narrows them
    (no teacher: no EMA key, and no mixup_alpha unless label_mixup)."""
    from smile_ray.config import METHOD_KEYS, reads
    from smile_ray.methods import method_class
    from smile_ray.registry import METHODS

    for switches in ({}, {"head_l2": False, "plain_tail": False, "mean_teacher": False, "regsl_self_labelling": True}):
        cfg = make_config(switches)
        for name in METHODS.names():
            declared = {k for k in METHOD_KEYS if reads(name, k, cfg)}
            assert method_class(name).used_keys(cfg) == declared, (name, switches)
    no_teacher = make_config({"feature_mixup": False, "source_label": False, "label_mixup": False})
    assert not {"ema_decay", "ema_every", "mixup_alpha"} & method_class("smile").used_keys(no_teacher)
    assert "mixup_alpha" in method_class("mixup").used_keys(no_teacher)


def test_methods_declare_the_keys_they_read():
    from smile_ray.methods import method_class

    cfg = make_config()
    # the baselines' own keys (tests/test_baselines.py checks who reads them)
    baseline_keys = {k for k in method_class("l2").METHOD_KEYS
                     if k.startswith(("l2sp_", "bss_", "delta_", "cotuning_", "rifle_", "stochnorm_", "lwf_", "regsl_"))}
    assert method_class("l2").unused_keys(cfg) >= {"mixup_alpha", "ema_decay", "feature_weight"}
    assert "head_l2_weight" not in method_class("l2").unused_keys(cfg)
    assert method_class("mixup").unused_keys(cfg) - baseline_keys == {
        "ema_decay", "ema_every", "ema_statistics", "ema_decay_horizon", "feature_weight", "source_label_weight",
        "feature_mixup", "source_label", "mean_teacher", "label_mixup"}
    assert method_class("smile").unused_keys(cfg) == baseline_keys
    assert method_class("smile").unused_keys(cfg.replace(source_label=False)) == {"source_label_weight"} | baseline_keys
    assert method_class("smile").may_skip_parameters(cfg.replace(head_l2=False))
    assert not method_class("smile").may_skip_parameters(cfg) and not method_class("l2").may_skip_parameters(cfg)


# ---------------------------------------------------------------- no host syncs in the step


def regsl_on(n_images, batch_size, threshold):
    from smile_ray.data import TensorTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_images, 1, 32, 32, generator=g), torch.randint(0, 5, (n_images,), generator=g)
    task = TensorTask({"train": (x, y), "val": (x, y), "test": (x, y)}, 5, seed=0)
    cfg = make_config({"method": "regsl", "batch_size": batch_size, "steps": 40,
                       "regsl_relabel_threshold": threshold})
    torch.manual_seed(0)
    source = build_source_model("digits_cnn", 5)
    regsl = build_method(cfg)
    regsl.attach(TransferNet(source, 5, source_head=False), source, task=task)
    return task, regsl


@pytest.mark.parametrize("n_images", [3, 10])  # 3 images, batches of 4: every batch holds an image twice
def test_regsl_relabelling_equals_the_masked_assignment(n_images):
    task, regsl = regsl_on(n_images, batch_size=4, threshold=0.5)
    labels = task.train_labels().clone()  # the first version's stored labels, updated by a boolean mask
    relabelled = 0
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        logits = 3 * torch.randn(4, 5, generator=g)  # about half the rows confident
        conf, pred = torch.softmax(logits, dim=1).max(dim=1)
        idx = task.train_indices(step, 4)
        change = (conf > 0.5) & (pred != labels[idx])
        labels[idx[change]] = pred[change]  # CPU: positions written in order, the last one wins
        relabelled += int(change.sum())
        regsl.relabel(logits, step)
        assert torch.equal(regsl.labels, labels), step
    assert regsl.info()["relabelled"] == relabelled and relabelled > 10
    assert not torch.equal(labels, task.train_labels())


def test_regsl_relabelling_needs_no_values_so_no_host_sync():
    # On the meta device tensors have shapes but no values: an operator whose output
    # shape depends on values (a boolean mask's selection, which CUDA answers by waiting
    # for the step) raises there.
    _, regsl = regsl_on(10, batch_size=4, threshold=0.5)
    regsl.labels, regsl.relabelled = regsl.labels.to("meta"), regsl.relabelled.to("meta")
    regsl.relabel(torch.randn(4, 5, device="meta"), 3)
    assert regsl.labels.shape == (10,)


def stochnorm_pair(p=0.5):
    """A stochnorm student and a copy whose layers draw their switches one layer at a
    time from their own generator (the first version)."""
    from smile_ray.methods.stochnorm import StochNorm2d

    source, model, method = make(make_config({"method": "stochnorm", "stochnorm_prob": p}))
    per_layer = copy.deepcopy(model)
    g = torch.Generator()
    for m in per_layer.modules():
        if isinstance(m, StochNorm2d):
            m.switches, m.generator = None, g
    return model, method, per_layer, g


def test_stochnorm_switches_drawn_once_per_step_are_the_per_layer_draws():
    from smile_ray import rng
    from smile_ray.methods.stochnorm import SWITCH_STREAM

    model, method, per_layer, g = stochnorm_pair()
    x, y = batch()
    for step in (0, 1, 7):
        loss, _ = method.loss(model, x, y, step)
        again = model(x).logits  # a second training forward in the step: the stream's next switches
        g.manual_seed(rng.derive_seed(method.config.seed, SWITCH_STREAM, step))
        want = torch.nn.functional.cross_entropy(per_layer(x).logits, y)
        want = want + method.config.head_l2_weight * 0.5 * sum(p.pow(2).sum() for p in per_layer.classifier.parameters())
        assert torch.equal(loss, want)
        assert torch.equal(again, per_layer(x).logits)
        for a, b in zip(model.state_dict().values(), per_layer.state_dict().values()):
            assert torch.equal(a, b)  # the running statistics too


def test_stochnorm_draws_once_per_step_and_compiles_without_graph_breaks():
    model, method, _, _ = stochnorm_pair()
    x, y = batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        method.loss(model, x, y, 3)
    assert sum(e.name == "aten::rand" for e in prof.events()) == 1  # not one per layer (3)
    import torch._dynamo as dynamo  # the graph capture of torch.compile

    method.switches.draw(x.device)
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def teacher_statistics_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = make_config({"ema_decay": 0.5, "ema_every": 1})
        torch.manual_seed(0)
        source = build_source_model("digits_cnn", 5)
        smile = build_method(cfg, rank=rank, world_size=2)
        model = TransferNet(source, 5, source_head=True)
        smile.attach(model, source)
        with torch.no_grad():  # each rank's student has its own running statistics after a step
            for n, b in bn_statistics(model.body):
                if not n.endswith("num_batches_tracked"):
                    b.fill_(10.0 * (rank + 1))
        smile.after_step(model, 0)
        results[rank] = {n: b.clone() for n, b in bn_statistics(smile.teacher.body)}
    finally:
        dist.destroy_process_group()


def test_data_parallel_teachers_average_rank_0s_statistics_and_stay_identical(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(teacher_statistics_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        got = dict(results)
    torch.manual_seed(0)
    source = build_source_model("digits_cnn", 5)
    for n, b in bn_statistics(source.body):
        want = b if n.endswith("num_batches_tracked") else 0.5 * b + 0.5 * 10.0  # rank 0's student
        for rank in (0, 1):
            torch.testing.assert_close(got[rank][n], want, msg=f"rank {rank}: {n}")
