"""Fine-tuning methods, one file each (``l2.py``, ``mixup.py``, ``smile.py`` and the
baselines ``l2sp.py``, ``bss.py``, ``lwf.py``, ``cotuning.py``, ``rifle.py``,
``stochnorm.py``, ``delta.py``, ``regsl.py``), built by name through
:data:`smile_ray.registry.METHODS`."""
from __future__ import annotations

from collections.abc import Iterable

from smile_ray.config import Config, make_config
from smile_ray.errors import SmileError
from smile_ray.methods.base import Method, unwrap
from smile_ray.registry import METHODS

__all__ = ["Method", "build_method", "check_keys_read", "method_class", "unwrap"]


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(config: Config, rank: int = 0, world_size: int = 1) -> Method:
    return method_class(config.method)(config, rank=rank, world_size=world_size)


def check_keys_read(keys: Iterable[str], configs: Iterable[Config], where: str = "--set") -> None:
    """Refuse a method's knob that the user set (``keys``: e.g. the ``--set`` keys) when no
    method of the run reads it under its config (``configs``: every config the run will
    train, e.g. each arm of an ablation); it would silently do nothing. Each method
    declares what it reads (:meth:`Method.used_keys`); the line names the methods that
    read the key."""
    configs = list(configs)
    for key in keys:
        if key not in Method.METHOD_KEYS or any(key in method_class(c.method).used_keys(c) for c in configs):
            continue
        readers = [m for m in METHODS.names() if key in method_class(m).used_keys(make_config({"method": m}))]
        methods = list(dict.fromkeys(c.method for c in configs))
        who = f"{methods[0]} does not" if len(methods) == 1 else f"none of {', '.join(methods)}"
        by = f"{key} is read by {', '.join(readers)}" if readers else f"no method reads {key} by default"
        raise SmileError(f"{where} {key}: {who} read{'s' if len(methods) > 1 else ''} it with this config, "
                         f"so it would do nothing ({by})")
