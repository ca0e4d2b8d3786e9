"""The generated docs (smile_ray/docs.py) match the code: docs/config.md lists every
config key as smile_ray/config.py declares it, and each docs/usage/<command>.md ends
with that command's --help. A key or option added without rerunning
`python -m smile_ray.docs` fails here."""
from __future__ import annotations

from pathlib import Path

import pytest

from smile_ray import docs
from smile_ray.config import KEYS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(docs.generated(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_docs_are_up_to_date(path):
    assert path.read_text() == docs.generated(ROOT)[path], (
        f"{path.relative_to(ROOT)} is out of date: run `python -m smile_ray.docs`")


def test_every_config_key_is_in_the_reference_with_its_default_and_help():
    text = (ROOT / "docs" / "config.md").read_text()
    for name, f in KEYS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        assert f"`{docs._shown(f.default)}`" in row and f.metadata["help"].split(";")[0].replace("|", "\\|") in row


def test_a_new_key_makes_the_reference_stale(monkeypatch):
    import dataclasses

    before = docs.config_reference()
    extra = dataclasses.field(default=7, metadata={"help": "a key added later"})
    extra.name, extra.type = "new_key", "int"
    monkeypatch.setitem(docs.KEYS, "new_key", extra)
    after = docs.config_reference()
    assert after != before and "| `new_key` | int | `7` |  |  | a key added later |" in after


def test_check_names_the_stale_file_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    (tmp_path / "docs" / "usage").mkdir(parents=True)
    (tmp_path / "docs" / "config.md").write_text("old\n")
    assert docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "docs/config.md" in err
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
    assert (tmp_path / "docs" / "usage" / "train.md").read_text().startswith("# `smile-ray train`")
