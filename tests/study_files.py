"""The small study files the tests write: a search space (``tune``), ablation
definitions (``ablate``) and comparison settings (``compare``), each tiny enough for a
2-core machine, and a writer that applies a test's changes to the top-level keys."""
from __future__ import annotations

import yaml

from conftest import FEW_IL_PAIRS

SPACE = {
    "base": {"method": "smile", "steps": 20, "eval_every": 10, "samples_per_class": 3, **FEW_IL_PAIRS},
    "num_samples": 4,
    "max_concurrent": 2,
    "space": {
        "mixup_alpha": {"loguniform": [0.05, 2.0]},
        "feature_weight": {"uniform": [0.0, 0.1]},
        "label_mixup": {"choice": [True, False]},
    },
}

DEFINITIONS = {
    "base": {"method": "smile", "steps": 20, "eval_every": 10, **FEW_IL_PAIRS},
    "seeds": 2,
    "samples_per_class": [3],
    "max_concurrent": 2,
    "components": {
        "feature_mixup": {"feature_mixup": False},
        "source_label": {"source_label": False},
        "mean_teacher": {"mean_teacher": False},
        "label_mixup": {"label_mixup": False},
        "head_l2": {"head_l2": False},
        "plain_tail": {"plain_tail": False},
    },
    "tune_space": {"mixup_alpha": {"loguniform": [0.05, 2.0]}, "source_label_weight": {"loguniform": [0.01, 1.0]}},
}

SETTINGS = {
    "base": {"steps": 20, "eval_every": 10, **FEW_IL_PAIRS},
    "columns": {"3 per class": {"samples_per_class": 3},
                # a setting that diverges at its first evaluation: its runs fail, the rest are kept
                "diverging": {"samples_per_class": 3, "lr": 1.0e6}},
    "seeds": 2,
    "max_concurrent": 2,
    "tune_space": {"smile": {"mixup_alpha": {"loguniform": [0.05, 2.0]}}},
}


def _write(path, content, changes):
    path.write_text(yaml.safe_dump({**content, **changes}, sort_keys=False))
    return path


def write_space(path, **changes):
    return _write(path, SPACE, changes)


def write_defs(path, **changes):
    return _write(path, DEFINITIONS, changes)


def write_settings(path, **changes):
    return _write(path, SETTINGS, changes)
