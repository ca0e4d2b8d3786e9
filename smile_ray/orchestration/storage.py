"""Where a study's trials and a Ray Train run keep their files: ``--storage``.

On one machine every file lives under ``--output``, as it always has. On a cluster of
several nodes the trials and Ray Train workers run on other nodes, whose disks the
driver cannot read and which the autoscaler deletes once idle; Ray refuses a local
storage path there ("A local path on the head node is not accessible by worker nodes").
So a multi-node study names a storage that every node reaches: a cloud URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``, anything ``pyarrow.fs`` opens) or a folder
mounted at the same path on every node (EFS, NFS). It is Ray Tune's and Ray Train's
``storage_path``, and each run writes its folder there (``metrics.json``, ``model.pt``,
its final checkpoint). The study's own files (tables, plots, ``study.json``) are written
by the driver in ``--output`` as on one machine, and each run's ``metrics.json`` comes
home beside them (``<output>/<experiment>/<trial>/run/``), so ``report`` reads the study
from ``--output`` alone; models and checkpoints stay in storage.

A study's storage root is ``<storage>/<output folder's name>``, recorded in the study's
state file, so ``--resume`` finds it; a root that already holds something is refused
(two studies would mix their trials). A URI may point an S3 client at another endpoint
through the environment as the AWS SDKs do (``AWS_ENDPOINT_URL``), which every node
must then have too.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from smile_ray.errors import SmileError

#: what comes home to ``--output`` from each run folder in storage: the files ``report``
#: and a reader of the study use; ``model.pt`` and checkpoints stay in storage
HOME_FILES = ("metrics.json",)


def is_uri(location: str | None) -> bool:
    return bool(location) and "://" in str(location)


def join(location: str, *parts: str) -> str:
    """``location`` (a URI or a local path) with ``parts`` appended."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def _filesystem(location: str):
    import pyarrow.fs

    if not is_uri(location):
        return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(str(location))
    except (ValueError, OSError, TypeError) as e:
        raise SmileError(f"--storage {location!r}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def study_root(storage: str, out: Path) -> str:
    """Where a study whose output folder is ``out`` keeps its trials in ``storage``."""
    return join(storage if is_uri(storage) else str(Path(storage).resolve()), Path(out).name)


def check_storage(storage: str, root: str | None = None, *, fresh: bool = True) -> None:
    """Fail in one line unless ``storage`` can be reached and written (its bucket exists,
    credentials work), and, with ``fresh``, unless ``root`` is still empty."""
    import pyarrow.fs

    fs, path = _filesystem(storage)
    try:
        if isinstance(fs, pyarrow.fs.LocalFileSystem):  # a folder (or file:// URI) on a shared disk
            Path(path).mkdir(parents=True, exist_ok=True)
        else:
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise SmileError(f"--storage {storage!r}: bucket {bucket!r} does not exist")
            probe = f"{path.rstrip('/')}/.smile-ray-probe"
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
        if fresh and root is not None:
            root_fs, root_path = _filesystem(root)
            if root_fs.get_file_info(root_path).type != pyarrow.fs.FileType.NotFound:
                raise SmileError(f"--storage: {root} already holds a study; use --resume, or another --output name")
    except SmileError:
        raise
    except OSError as e:
        raise SmileError(f"cannot use --storage {storage!r}: {_first_line(e)}") from None


def upload(local: Path, location: str) -> None:
    """Copy the folder ``local`` to ``location`` (a URI or a path on a shared disk)."""
    import pyarrow.fs

    fs, path = _filesystem(location)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


@contextmanager
def staged(location: str) -> Iterator[Path]:
    """A local folder for a run whose folder belongs at ``location``: the folder itself
    when ``location`` is a local path, else a scratch folder on this node that is
    uploaded to ``location`` when the run ends without error, then removed."""
    if not is_uri(location):
        yield Path(location)
        return
    scratch = Path(tempfile.mkdtemp(prefix="smile-ray-run-"))
    try:
        yield scratch
        upload(scratch, location)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bring_home(root: str, out: Path, names: tuple[str, ...] = HOME_FILES) -> int:
    """Copy every file called one of ``names`` under the storage ``root`` to the same
    relative place under ``out``; returns how many came. Nothing to do when ``root`` is
    ``out`` itself."""
    import pyarrow.fs

    if not is_uri(root) and Path(root).resolve() == Path(out).resolve():
        return 0
    fs, base = _filesystem(root)
    base = base.rstrip("/")
    if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
        return 0
    n = 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True)):
        if info.type != pyarrow.fs.FileType.File or info.base_name not in names:
            continue
        target = Path(out) / info.path[len(base):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1
    return n


def require_for_cluster(storage: str | None, nodes: int) -> None:
    """A cluster of several nodes shares no disk by default: refuse to start a study
    whose trials would write where the driver cannot read (Ray itself fails each trial
    at its first checkpoint, half-way through the study)."""
    if nodes > 1 and not storage:
        raise SmileError(f"this Ray cluster has {nodes} nodes, which share no disk: give --storage "
                         "s3://bucket/prefix (or a folder mounted at the same path on every node)")
