"""smile-ray: SMILE fine-tuning (Li et al., 2022) with Ray Train/Tune and MLflow.

Layers, bottom up: the core (``config``, ``registry``, ``data/``, ``models/``,
``methods/``, ``losses``, ``metrics``, ``checkpoint``, ``pretrain``, ``recipe``) is plain
PyTorch and imports neither Ray nor MLflow; ``orchestration/`` runs the core under Ray
Train and Ray Tune and tracks it in MLflow; ``reports/`` turns results into tables and
plots; ``api`` is the Python API over all of them; ``cli`` is the command line.
``tests/test_layers.py`` holds the package to that.

The Python API (:mod:`smile_ray.api`; docs/python-api.md): ``train``, ``tune``,
``ablate``, ``compare``, ``report`` take what their commands take and return data;
``load_model`` gives a fine-tuned network ready for inference. Importing ``smile_ray``
imports neither torch nor Ray: each function imports what it needs on first use.
A user's own method, dataset or backbone by name: ``smile_ray.register_method /
register_dataset / register_backbone`` or an entry point (``docs/backbones.md``).
"""
from smile_ray.api import (LoadedModel, StudyResult, TableResult, TrainResult, ablate, compare, load_model, report,
                           train, tune)
from smile_ray.config import Config, make_config, resolve_config
from smile_ray.errors import SmileError
from smile_ray.registry import register_backbone, register_dataset, register_method

__version__ = "0.1.0"
__all__ = ["Config", "LoadedModel", "SmileError", "StudyResult", "TableResult", "TrainResult", "ablate", "compare",
           "load_model", "make_config", "register_backbone", "register_dataset", "register_method", "report",
           "resolve_config", "train", "tune", "__version__"]
