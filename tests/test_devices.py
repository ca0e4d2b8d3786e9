"""Which device a run trains on (:func:`smile_ray.recipe.pick_device`), and which GPUs a
trial may hold (:func:`smile_ray.orchestration.spaces.check_gpus`): decisions tested as
pure functions, without a GPU (a trial through Tune on the CPU: tests/test_trainable.py)."""
import pytest
import torch

from smile_ray.errors import SmileError
from smile_ray.orchestration.spaces import check_gpus
from smile_ray.recipe import pick_device


@pytest.mark.parametrize("name, cuda, assigned, expected", [
    ("auto", True, None, "cuda"),      # outside Ray: CUDA wherever it works
    ("auto", False, None, "cpu"),
    ("auto", True, [], "cpu"),         # inside Ray, no GPU reserved: not GPU 0 behind Ray's back
    ("auto", False, [], "cpu"),
    ("auto", True, ["3"], "cuda"),     # Ray made GPU 3 the only visible one: cuda(:0)
    ("auto", True, ["0", "1"], "cuda"),
    ("cpu", True, ["0"], "cpu"),       # an explicit device is kept
    ("cpu", True, None, "cpu"),
    ("cuda:1", True, None, "cuda:1"),
])
def test_the_device_follows_what_ray_assigned(name, cuda, assigned, expected):
    assert pick_device(name, cuda, assigned) == torch.device(expected)


def test_a_gpu_assigned_where_cuda_does_not_work_is_one_line_naming_the_node():
    with pytest.raises(SmileError) as e:
        pick_device("auto", False, ["0"], where="node 10.0.0.7 (gpu-node-1)")
    text = str(e.value)
    assert "\n" not in text and "node 10.0.0.7 (gpu-node-1)" in text and "GPU 0" in text and "driver" in text
    with pytest.raises(SmileError, match="device=cuda: no CUDA device is available on this machine"):
        pick_device("cuda", False)


@pytest.mark.parametrize("gpus, workers, expected", [
    (0, 1, 0), (1, 1, 1), (0.25, 1, 0.25), (0.5, 1, 0.5), (4, 4, 4), (0, 4, 0), (1.0, 1, 1),
])
def test_gpus_a_trial_can_use_are_accepted(gpus, workers, expected):
    got = check_gpus(gpus, workers, "resources.gpus")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("gpus, workers, message", [
    (2, 1, "a one-process trial trains on one GPU"),     # today: holds two, uses one
    (1.5, 1, "a one-process trial trains on one GPU"),
    (2, 4, "each Ray Train worker takes one whole GPU"),
    (0.5, 2, "each Ray Train worker takes one whole GPU"),
    (-1, 1, "must be a number >= 0"),
    ("one", 1, "must be a number >= 0"),
    (True, 1, "must be a number >= 0"),
])
def test_gpus_a_trial_cannot_use_are_refused(gpus, workers, message):
    with pytest.raises(SmileError, match=message):
        check_gpus(gpus, workers, "resources.gpus")
