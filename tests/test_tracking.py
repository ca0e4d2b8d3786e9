"""MLflow tracking (orchestration layer): the store's refusals reach the user whole."""
import pytest

from smile_ray.errors import SmileError
from smile_ray.orchestration import tracking


def test_a_file_store_refusal_keeps_mlflows_whole_hint(tmp_path, monkeypatch):
    """MLflow 3 refuses ``file:`` stores and names its own way out at the end of a long
    message; the line used to be cut at "See htt"."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = f"file:{tmp_path / 'mlruns'}"
    with pytest.raises(SmileError) as e:
        tracking.connect(uri)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"--tracking-uri {uri!r} is not usable: ")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "https://mlflow.org/docs/" in line
    assert not (tmp_path / "mlruns").exists()
