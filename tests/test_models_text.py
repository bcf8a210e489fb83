"""``python -m jacfast text``: the corpus reader and the experiment at --tiny size."""
import json
import os

import pytest
import torch

from jacfast import corpus as C
from jacfast.cli import main

FORTUNES = "A stitch in time saves nine.\n    -- proverb\n%\nTo be or not to be.\n%\n" \
    "Tab\there, and an overstrike: _\bx; non-ASCII: caf\u00e9.\n%\n"


def _fake_dir(tmp_path, copies=60):
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "wisdom").write_text(FORTUNES * copies)
    (d / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    os.symlink("wisdom", d / "wisdom.u8")
    (d / "ascii-art").write_text("(\\_/)\n%\n")
    return str(d)


def test_read_fortunes_parses_and_cleans(tmp_path):
    docs = C.read_fortunes(_fake_dir(tmp_path, copies=1))
    assert docs == ["A stitch in time saves nine.\n    -- proverb", "To be or not to be.",
                    "Tab    here, and an overstrike: x; non-ASCII: caf\u00e9."]
    v = C.CharVocab()
    ids = v.encode(docs[2])
    assert len(v) == 97 and ids.dtype == torch.int64 and int(ids[-2]) == 0  # the é
    assert v.decode(v.encode(docs[0])) == docs[0]


def test_read_fortunes_missing_dir_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        C.read_fortunes(str(tmp_path / "none"))


def test_split_take_and_windows():
    docs = [f"doc {i} " * (i % 5 + 1) for i in range(50)]
    train, test = C.split_fortunes(docs, 0.2, seed=0)
    assert len(test) == 10 and sorted(train + test) == sorted(docs) and not set(train) & set(test)
    assert C.split_fortunes(docs, 0.2, seed=0) == (train, test)
    sub = C.take_chars(train, 100, seed=1)
    assert len(C.join_text(sub)) >= 100 - 3 and set(sub) <= set(train)
    stream = torch.arange(20)
    ids, y = C.random_windows(stream, 4, 5, torch.Generator().manual_seed(0))
    assert ids.shape == y.shape == (4, 5) and torch.equal(y, ids + 1)
    ids, y = C.eval_windows(stream, 6)
    assert ids.shape == (3, 6) and torch.equal(ids.flatten(), torch.arange(18)) and torch.equal(y, ids + 1)


def test_text_tiny_end_to_end(tmp_path):
    """Every method at --tiny on a small fortune folder: files written, numbers finite, a rerun
    skips the finished runs, changed settings are refused."""
    out = str(tmp_path / "out")
    args = ["text", "--tiny", "--out", out, "--text-dir", _fake_dir(tmp_path), "--seeds", "0", "1",
            "--methods", "ce", "kd", "kd+jac", "--no-progress"]
    assert main(args) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert {r["method"] for r in res["runs"]} == {"ce", "kd", "kd+jac"} and len(res["runs"]) == 6
    assert set(res["summary"]) == {"ce", "kd", "kd+jac"}
    for r in res["runs"]:
        assert 1 < r["test"]["perplexity"] < 1e3 and 0 <= r["test"]["accuracy"] <= 1
    jac = [r["train_loss_mean"]["jac"] for r in res["runs"] if r["method"] == "kd+jac"]
    assert all(0 < j <= 4 for j in jac)  # the normalized term is in (0, 4] per row
    assert [r["train_loss_mean"]["jac"] for r in res["runs"] if r["method"] == "kd"] == [0.0, 0.0]
    assert res["revision"] and res["settings"]["estimator"] == "finite_difference"
    for name in ("results.md", "text.png", "teacher.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    mtime = os.path.getmtime(os.path.join(out, "runs", "kd-seed0", "result.json"))
    assert main(args) == 0  # everything finished: nothing retrained
    assert os.path.getmtime(os.path.join(out, "runs", "kd-seed0", "result.json")) == mtime
    with pytest.raises(SystemExit, match="other settings.*beta"):
        main(args + ["--beta", "0.5"])
