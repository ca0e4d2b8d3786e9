"""Source models: the cached file is a function of its cache key."""
import torch

from smile_ray import pretrain
from smile_ray.config import make_config
from smile_ray.registry import DATASETS


def test_pretraining_gives_the_same_weights_whatever_the_callers_thread_count(monkeypatch, tmp_path):
    """The key holds no thread count of the caller's, so the weights must not follow it
    (they did: a 1-thread Ray trial and a 2-thread ``train`` cached different models)."""
    monkeypatch.setitem(pretrain.RECIPE, "steps", 30)
    config = make_config()
    task = DATASETS.get(config.dataset).source(config, tmp_path)
    saved = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            model, info = pretrain.pretrain_source(task, config.backbone)
            assert torch.get_num_threads() == threads  # the caller's count is restored
            weights.append(model.weights_state_dict())
    finally:
        torch.set_num_threads(saved)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert info["threads"] == 1 and "threads" in pretrain.RECIPE


def test_the_cache_key_follows_the_recipe(tmp_path, monkeypatch):
    before = pretrain.source_weights_path(make_config(), tmp_path)
    monkeypatch.setitem(pretrain.RECIPE, "threads", 2)
    assert pretrain.source_weights_path(make_config(), tmp_path) != before
