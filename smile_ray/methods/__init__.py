"""Fine-tuning methods, one file each (``l2.py``, ``mixup.py``, ``smile.py`` and the
baselines ``l2sp.py``, ``bss.py``, ``lwf.py``, ``cotuning.py``, ``rifle.py``,
``stochnorm.py``, ``delta.py``, ``regsl.py``), built by name through
:data:`smile_ray.registry.METHODS`."""
from __future__ import annotations

from smile_ray.config import Config
from smile_ray.methods.base import Method, unwrap
from smile_ray.registry import METHODS

__all__ = ["Method", "build_method", "method_class", "unwrap"]


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(config: Config, rank: int = 0, world_size: int = 1) -> Method:
    return method_class(config.method)(config, rank=rank, world_size=world_size)
