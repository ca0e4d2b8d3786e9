"""Storage a study's runs write to (:mod:`smile_ray.orchestration.storage`), through
pyarrow's real filesystems: a local folder, and a ``file://`` URI, which takes the same
path as ``s3://`` (staged on the node, uploaded, brought home). The S3 protocol itself,
on a cluster whose worker shares no disk, is in ``test_storage_cluster.py``."""
import json

import pytest

from smile_ray.errors import SmileError
from smile_ray.orchestration import storage


def test_join_and_the_study_root(tmp_path):
    assert storage.join("s3://b/p/", "study", "tune") == "s3://b/p/study/tune"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert storage.study_root("s3://b/studies", tmp_path / "runs" / "cub-tune") == "s3://b/studies/cub-tune"
    assert storage.study_root(str(tmp_path / "shared"), tmp_path / "runs" / "x") == str(tmp_path / "shared" / "x")


def test_a_run_folder_staged_on_the_node_is_uploaded_at_its_end(tmp_path):
    dest = f"file://{tmp_path / 'bucket' / 'study' / 'tune' / 't1' / 'run'}"
    with storage.staged(dest) as local:
        assert "bucket" not in str(local)  # a scratch folder on this node
        (local / "metrics.json").write_text(json.dumps({"steps": 3}))
        (local / "checkpoint").mkdir()
        (local / "checkpoint" / "state.pt").write_bytes(b"x")
    assert not local.exists()
    run = tmp_path / "bucket" / "study" / "tune" / "t1" / "run"
    assert json.loads((run / "metrics.json").read_text()) == {"steps": 3}
    assert (run / "checkpoint" / "state.pt").read_bytes() == b"x"


def test_a_failed_run_uploads_nothing_and_leaves_no_scratch(tmp_path):
    dest = f"file://{tmp_path / 'bucket' / 'run'}"
    with pytest.raises(RuntimeError):
        with storage.staged(dest) as local:
            (local / "model.pt").write_bytes(b"half")
            raise RuntimeError("diverged")
    assert not local.exists() and not (tmp_path / "bucket").exists()


def test_a_local_location_is_written_in_place(tmp_path):
    with storage.staged(str(tmp_path / "run")) as local:
        assert local == tmp_path / "run"


def test_metrics_come_home_and_models_stay_in_storage(tmp_path):
    bucket = tmp_path / "bucket" / "study" / "tune"
    for trial in ("t1", "t2"):
        (bucket / trial / "run" / "replicate-0").mkdir(parents=True)
        (bucket / trial / "run" / "metrics.json").write_text("{}")
        (bucket / trial / "run" / "replicate-0" / "metrics.json").write_text("{}")
        (bucket / trial / "run" / "model.pt").write_bytes(b"weights")
    out = tmp_path / "out" / "tune"
    assert storage.bring_home(f"file://{bucket}", out) == 4
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "t1/run/metrics.json", "t1/run/replicate-0/metrics.json", "t2/run/metrics.json",
        "t2/run/replicate-0/metrics.json"]
    assert storage.bring_home(str(out), out) == 0  # one machine: nothing to bring


def test_storage_is_checked_before_anything_starts(tmp_path):
    root = storage.study_root(str(tmp_path / "shared"), tmp_path / "study")
    storage.check_storage(str(tmp_path / "shared"), root)
    (tmp_path / "shared" / "study").mkdir()
    with pytest.raises(SmileError, match="already holds a study; use --resume, or another --output name"):
        storage.check_storage(str(tmp_path / "shared"), root)
    storage.check_storage(str(tmp_path / "shared"), root, fresh=False)  # --resume
    with pytest.raises(SmileError, match="--storage 'nosuch://x'"):
        storage.check_storage("nosuch://x")


def test_several_nodes_need_storage():
    storage.require_for_cluster(None, 1)
    storage.require_for_cluster("s3://b/p", 3)
    with pytest.raises(SmileError, match="this Ray cluster has 3 nodes, which share no disk: give --storage"):
        storage.require_for_cluster(None, 3)
