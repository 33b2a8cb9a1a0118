"""Atomic writes: a reader sees the whole file under its name, or none of it."""

from __future__ import annotations

import json

import pytest

from flexmoe.core.io import atomic_file, atomic_write_json, atomic_write_text


def test_a_write_appears_whole_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("\n")
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = atomic_write_text(tmp_path / "progress.json", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]
