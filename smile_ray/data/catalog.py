"""What an image dataset's native files say: its classes and its official training and
test images with their labels (a :class:`Catalog`), plus the helpers every loader uses
to read metadata with one-line errors naming the file and the layout expected.

A loader (``cub200.py``, ``stanford_cars.py``, ...) only reads metadata here: it opens
no image. :mod:`smile_ray.data.images` turns a catalog into a training task (validation
hold-out, the paper's subsets, image checks, the DataLoader pipeline).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smile_ray.errors import SmileError

#: file name endings taken as images in class folders (case-insensitive)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class Images:
    """Images addressed by position: ``open(i)`` gives a PIL image (not yet decoded);
    ``names[i]`` is how messages name image ``i`` (its path)."""

    def __init__(self, names: Sequence[str | Path]):
        self.names = [str(n) for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i]

    def open(self, i: int):
        raise NotImplementedError

    def take(self, indices: Sequence[int]) -> "Images":
        """The images at ``indices``, in that order."""
        raise NotImplementedError

    def stamp(self, i: int) -> Any:
        """A key that changes when image ``i`` changes (for the per-process check cache);
        None: the image needs no check (it is already decoded in memory)."""
        return None

    def read_bytes(self, i: int) -> bytes | None:
        """Image ``i``'s encoded file as it is on disk (for decoding elsewhere, e.g. on a
        GPU); None: the image is already decoded in memory (``open`` gives its pixels)."""
        return None

    def fingerprint(self) -> bytes:
        """Bytes that identify these images (paths, sizes and times; or the pixels)."""
        raise NotImplementedError


class FileImages(Images):
    """Image files by path."""

    def __init__(self, paths: Sequence[str | Path]):
        super().__init__(paths)
        self.paths = self.names

    def open(self, i: int):
        from PIL import Image

        return Image.open(self.paths[i])

    def take(self, indices: Sequence[int]) -> "FileImages":
        return FileImages([self.paths[int(i)] for i in indices])

    def stamp(self, i: int) -> Any:
        try:
            st = os.stat(self.paths[i])
        except OSError:
            return (self.paths[i], -1, -1)
        return (self.paths[i], st.st_size, st.st_mtime_ns)

    def read_bytes(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def fingerprint(self) -> bytes:
        return json.dumps([self.stamp(i) for i in range(len(self))]).encode()


class ArrayImages(Images):
    """Decoded RGB images held as one uint8 array ``(N, H, W, 3)`` (CIFAR)."""

    def __init__(self, array: np.ndarray, names: Sequence[str]):
        super().__init__(names)
        self.array = array

    def open(self, i: int):
        from PIL import Image

        return Image.fromarray(self.array[i])

    def take(self, indices: Sequence[int]) -> "ArrayImages":
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImages(self.array[idx], [self.names[i] for i in idx])

    def fingerprint(self) -> bytes:
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.array).tobytes()).digest()


@dataclass
class Catalog:
    """A dataset's classes (label order) and official splits. ``train`` is what the
    paper trains on (Aircraft's trainval, Flowers' trn + val); validation is held out
    from it later."""

    dataset: str
    root: Path
    classes: list[str]
    train: Images
    train_labels: np.ndarray
    test: Images
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            labels = np.asarray(getattr(self, f"{split}_labels"), dtype=np.int64)
            setattr(self, f"{split}_labels", labels)
            if len(labels) != len(getattr(self, split)):
                raise ValueError(f"{self.dataset}: {split} has {len(getattr(self, split))} images, {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise SmileError(f"{self.dataset}: a {split} label lies outside 0..{len(self.classes) - 1} "
                                 f"({int(labels.min())}..{int(labels.max())}) under {self.root}")
        if not len(self.train_labels):
            raise SmileError(f"{self.dataset}: no training images found under {self.root}")


# ------------------------------------------------------------------ reading native files


def dataset_root(config_root: str, dataset: str, layout: str) -> Path:
    """The user's ``data_root`` as an existing folder, or a one-line error."""
    if not config_root:
        raise SmileError(f"{dataset}: set data_root to the folder holding {layout} (nothing is downloaded)")
    root = Path(config_root).expanduser()
    if not root.is_dir():
        raise SmileError(f"{dataset}: data_root {root} is not a folder; expected {layout}")
    return root


def find_base(root: Path, marker: str, candidates: Sequence[str]) -> Path:
    """The folder under ``root`` that holds ``marker``: ``root`` itself or one of the
    ``candidates`` below it (so ``data_root`` may name the archive's folder or its parent)."""
    for sub in ("", *candidates):
        base = root / sub if sub else root
        if (base / marker).exists():
            return base
    return root


def need(path: Path, dataset: str, layout: str) -> Path:
    """``path`` if it exists, else a one-line error naming it and the layout expected."""
    if not path.exists():
        raise SmileError(f"{dataset}: missing {path}; expected {layout}")
    return path


def read_lines(path: Path, dataset: str, layout: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a text file; Windows line ends and
    surrounding white space are stripped."""
    need(path, dataset, layout)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = path.read_bytes().decode("latin-1")
    except OSError as e:
        raise SmileError(f"{dataset}: cannot read {path} ({e.__class__.__name__})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def split_pairs(path: Path, dataset: str, layout: str, form: str) -> list[tuple[str, str]]:
    """Lines ``"<key> <value>"`` split on the first white space (values may hold spaces)."""
    out = []
    for n, line in read_lines(path, dataset, layout):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise SmileError(f"{path}:{n}: expected '{form}', got {line!r}")
        out.append((parts[0], parts[1].strip()))
    return out


def to_int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SmileError(f"{path}: {what} {value!r} is not an integer") from None


def load_mat(path: Path, dataset: str, layout: str, keys: Sequence[str]) -> dict[str, Any]:
    """``scipy.io.loadmat(path, squeeze_me=True)``, checked to hold ``keys``."""
    from scipy.io import loadmat

    need(path, dataset, layout)
    try:
        data = loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises many types for foreign or truncated files
        raise SmileError(f"{dataset}: {path} is not a readable MATLAB file ({e.__class__.__name__})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise SmileError(f"{dataset}: {path} has no variable {missing[0]!r}; expected {', '.join(keys)}")
    return data


def mat_vector(value: Any) -> np.ndarray:
    """A squeezed MATLAB vector or cell as a 1-d array (a single element squeezes to a
    scalar: ``np.atleast_1d`` undoes that)."""
    return np.atleast_1d(np.asarray(value)).reshape(-1)


def class_folders(base: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``base``."""
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_in(folder: Path) -> list[Path]:
    """Sorted image files (by extension, hidden files left out) directly in ``folder``."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
