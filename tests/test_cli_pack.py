"""`plan pack`: figures on the real SQuAD length histogram, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meshplan.cli.main import main
from meshplan.runtime.packing import SQUAD11_HISTOGRAM as SQUAD


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_squad_json_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["pack", str(SQUAD), "--seq-len", "2048", "--dp", "8", "--json"], capsys)
    assert (code, err) == (0, "")
    figures = json.loads(out)
    assert figures["n_input"] == 88641
    assert figures["efficiency"] >= 0.9973  # whole-dataset FFD reaches 99.73 %
    assert figures["n_bins"] >= figures["l2_bound"] and figures["gap_to_l2"] == figures["n_bins"] - figures["l2_bound"]
    assert figures["padding_tokens"] == figures["n_bins"] * 2048 - figures["tokens"]
    # Dealing by cost over windows balances attention better than taking bins in order.
    assert figures["imbalance"]["attention_mean"] < figures["imbalance_round_robin"]["attention_mean"]


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lengths.npy"
    np.save(path, np.array([5, 3, 4, 4, 2, 6], dtype=np.int64))
    code, out, err = run(["pack", str(path), "--seq-len", "8", "--algorithm", "bfd"], capsys)
    assert (code, err) == (0, "")
    assert "│ bins" in out and "│ efficiency" in out and "100.00 %" in out  # 24 tokens in 3 full bins


@pytest.mark.parametrize("content,message", [
    ('{"counts": []}', "the histogram holds no sequences"),
    ("[1, 2", "not valid JSON"),
    ("[1, 2]\n[]\n", "empty sequence (length 0)"),
])
def test_bad_data_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                     message: str | None) -> None:
    path = tmp_path / ("h.json" if content.startswith("{") else "t.jsonl")
    path.write_text(content)
    code, out, err = run(["pack", str(path), "--seq-len", "8"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("plan pack: ")
    if message:
        assert message in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["pack", str(tmp_path / "missing.npy"), "--seq-len", "8"], capsys)
    assert (code, err) == (2, f"plan pack: error: no such file: {tmp_path / 'missing.npy'}\n")
    code, _, err = run(["pack", str(tmp_path), "--seq-len", "0"], capsys)
    assert code == 2 and "argument --seq-len: 0 is out of range: expected 1 to 16,777,216 (tokens per bin)" in err
