"""load_lengths: the three formats, and a one-line PackingError naming the file (and the
line, for JSONL) for everything else."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from meshplan.runtime.packing import PackingError, load_lengths


def test_npy(tmp_path: Path) -> None:
    p = tmp_path / "lens.npy"
    np.save(p, np.array([3, 1, 4], dtype=np.int32))
    out = load_lengths(p)
    assert out.dtype == np.int64 and out.tolist() == [3, 1, 4]


def test_histogram(tmp_path: Path) -> None:
    p = tmp_path / "hist.json"
    p.write_text(json.dumps({"source": "x", "counts": [0, 2, 0, 1]}))
    assert load_lengths(p).tolist() == [2, 2, 4]


def test_jsonl_lists_and_objects(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    p.write_text('[5, 6, 7]\n\n{"input_ids": [1, 2], "labels": [0]}\n[9]\n')
    assert load_lengths(p).tolist() == [3, 2, 1]


def _write(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p

    return make


def _npy(name: str, arr: np.ndarray) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        np.save(p, arr)
        return p

    return make


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.npy", "missing.npy: no such file"),
        (
            _write("lens.txt", "3\n"),
            "lens.txt: unsupported length file (expected .npy, .json, .jsonl)",
        ),
        (_write("empty.jsonl", ""), "empty.jsonl: file is empty"),
        (_write("blank.jsonl", "\n  \n"), "blank.jsonl: no sequences (only blank lines)"),
        (_write("bad.jsonl", "[1, 2]\n[3,\n"), "bad.jsonl:2: not valid JSON"),
        (_write("zero.jsonl", "[1, 2]\n\n[]\n"), "zero.jsonl:3: empty sequence (length 0)"),
        (
            _write("obj.jsonl", '{"text": "hi"}\n'),
            'obj.jsonl:1: expected a list of token ids or an object with an "input_ids" list',
        ),
        (_write("float.jsonl", "[1, 2.5]\n"), "float.jsonl:1: token ids must be integers"),
        (_write("bytes.jsonl", b"[1]\n\xff\xfe\n"), "bytes.jsonl:2: not UTF-8 text"),
        (_write("h.json", "{counts: []}"), "h.json: not valid JSON"),
        (_write("h.json", "[1, 2]"), 'h.json: expected a histogram object {"counts": [...]}'),
        (_write("h.json", '{"counts": [1, "2"]}'), 'h.json: "counts" must be a list of integers'),
        (_write("h.json", '{"counts": [1, -2]}'), 'h.json: "counts" must be >= 0; counts[1] is -2'),
        (_write("h.json", '{"counts": [0, 0]}'), "h.json: the histogram holds no sequences"),
        (
            _npy("z.npy", np.array([3, 0, -1])),
            "z.npy: lengths must be >= 1; 2 are not (first at index 1: 0)",
        ),
        (_npy("f.npy", np.array([1.5, 2.0])), "f.npy: lengths must be integers, got float64"),
        (
            _npy("m.npy", np.ones((2, 2), np.int64)),
            "m.npy: expected a 1-D array of lengths, got shape (2, 2)",
        ),
        (_npy("e.npy", np.zeros(0, np.int64)), "e.npy: no sequences"),
        (_write("junk.npy", b"not an array"), "junk.npy: not a valid .npy array"),
    ],
)
def test_bad_files(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(PackingError) as info:
        load_lengths(path)
    text = str(info.value)
    assert text.startswith(f"{tmp_path}/{message}"), text
    assert "\n" not in text
