"""Target (and source) tasks by name: one file per dataset (``digits.py``, ...), each
defining a :class:`~smile_ray.data.task.DatasetSpec` that :data:`smile_ray.registry.DATASETS`
names.

* ``task.py``: the :class:`~smile_ray.data.task.Task` interface every task implements, the
  step-keyed order of training images, :class:`DatasetSpec` and :func:`build_task`;
* ``tensor_task.py``: :class:`TensorTask`, small datasets held in memory as tensors, and
  their shift augmentation;
* ``images.py``: :class:`~smile_ray.data.images.ImageTask`, image files decoded in
  DataLoader workers; ``catalog.py``: what an image dataset's native files say;
* ``subsets.py``: the fixed hold-outs and the paper's subsets, for every dataset.
"""
from __future__ import annotations

from smile_ray.data.task import DatasetSpec, StepOrder, Task, build_task
from smile_ray.data.tensor_task import (TensorTask, apply_shift, normalise_rgb, random_shift, shift_offsets,
                                        weights_norm)

__all__ = ["DatasetSpec", "StepOrder", "Task", "TensorTask", "apply_shift", "build_task", "normalise_rgb",
           "random_shift", "shift_offsets", "weights_norm"]
