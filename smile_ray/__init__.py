"""smile-ray: SMILE fine-tuning (Li et al., 2022) with Ray Train/Tune and MLflow.

Layers, bottom up: the core (``config``, ``registry``, ``data/``, ``models/``,
``methods/``, ``losses``, ``metrics``, ``checkpoint``, ``pretrain``, ``recipe``) is plain
PyTorch and imports neither Ray nor MLflow; ``orchestration/`` runs the core under Ray
Train and Ray Tune and tracks it in MLflow; ``reports/`` turns results into tables and
plots; ``cli`` is the command line. ``tests/test_layers.py`` holds the package to that.

The Python API: ``smile_ray.train(smile_ray.make_config({...}), "runs/x")``; a user's own
method, dataset or backbone by name: ``smile_ray.register_method / register_dataset /
register_backbone`` or an entry point (``docs/backbones.md``).
"""
from smile_ray.config import Config, make_config, resolve_config
from smile_ray.errors import SmileError
from smile_ray.registry import register_backbone, register_dataset, register_method

__version__ = "0.1.0"
__all__ = ["Config", "SmileError", "make_config", "register_backbone", "register_dataset", "register_method",
           "resolve_config", "train", "__version__"]


def train(*args, **kwargs):
    """:func:`smile_ray.recipe.train`, imported on first use (it pulls in torch)."""
    from smile_ray.recipe import train as run_train

    return run_train(*args, **kwargs)
