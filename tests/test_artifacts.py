from __future__ import annotations

import pytest

from unisd.artifacts import (
    atomic_path,
    completed_manifest,
    hash_files,
    read_jsonl,
    write_jsonl,
    write_manifest,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_jsonl_roundtrip_and_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "rows.jsonl"
    assert write_jsonl(p, [{"a": 1}, {"a": 2}]) == 2
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2"):
        read_jsonl(p)


def test_manifest_skip_logic(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.jsonl").write_text("1\n")
    h1 = hash_files([src], extra={"k": 1})
    assert hash_files([src], extra={"k": 1}) == h1
    assert hash_files([src], extra={"k": 2}) != h1
    out = tmp_path / "out"
    assert completed_manifest(out, h1) is None
    write_manifest(out, stage="t", config={}, inputs_hash=h1, counts={"n": 1}, timings={"all": 0.1})
    assert completed_manifest(out, h1)["counts"] == {"n": 1}
    assert completed_manifest(out, "other") is None
    (src / "x.jsonl").write_text("2\n")
    assert hash_files([src], extra={"k": 1}) != h1


def test_partial_jsonl_drops_and_cuts_a_torn_last_line(tmp_path):
    from unisd.artifacts import read_partial_jsonl

    path = tmp_path / "partial.jsonl"
    assert read_partial_jsonl(path) == []
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')  # killed while appending row 3
    assert read_partial_jsonl(path) == [{"id": 1}, {"id": 2}]
    with open(path, "a") as f:  # the resumed writer appends on a fresh line
        f.write('{"id": 3}\n')
    assert read_partial_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3}]
    path.write_text('{"id": 1}\n{"id": oops}\n{"id": 3}\n')  # corruption mid-file is an error, not a tear
    with pytest.raises(ValueError, match="line 2"):
        read_partial_jsonl(path)
