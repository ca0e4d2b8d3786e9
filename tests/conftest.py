"""Shared fixtures. The source model is pre-trained once per test session into a
temporary cache (about a minute on two cores); every test reuses it."""
from __future__ import annotations

import pytest

from smile_ray.config import make_config
from smile_ray.pretrain import load_source


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    load_source(make_config(), path, log=lambda msg: None)  # pre-train once
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch, tmp_path_factory):
    # Nothing in the tests may write to the user's real cache.
    monkeypatch.setenv("SMILE_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "user-cache"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray, started once per test module by the product's own start-up code."""
    import ray

    from smile_ray.distributed import connect

    connect()
    yield
    ray.shutdown()
