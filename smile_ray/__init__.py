"""smile-ray: SMILE fine-tuning (Li et al., 2022) with Ray Train/Tune and MLflow.

The core (config, data, models, losses, methods, training loop) is plain PyTorch; the
orchestration layers on top of it are the only modules that import Ray or MLflow.
"""
from smile_ray.config import Config, make_config, resolve_config
from smile_ray.errors import SmileError

__version__ = "0.1.0"
__all__ = ["Config", "SmileError", "make_config", "resolve_config", "train", "__version__"]


def train(*args, **kwargs):
    """:func:`smile_ray.train.train`, imported lazily (it pulls in torch)."""
    from smile_ray.train import train as _train

    return _train(*args, **kwargs)
