"""common.py: atomic writes, append, output-over-input checks, flags from a dataclass, seeds."""
import argparse
import errno
import os
import re
from dataclasses import dataclass

import pytest

import common
from common import DataError


def test_a_failed_write_names_its_path_and_keeps_what_was_there(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    common.write_json(str(path), {"a": 1})
    with pytest.raises(OSError, match=rf"{re.escape(str(path))}: cannot write it \(No space left on device\); what"):
        with common.atomic_path(str(path)) as tmp:
            open(tmp, "w").write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert common.read_json(str(path)) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]
    ckpt = tmp_path / "ckpt"  # a directory: moved aside, then put back when the new one cannot be moved in
    common.write_text(str(ckpt / "old.txt"), "old")
    monkeypatch.setattr(common.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="ckpt: cannot write it"):
        with common.atomic_path(str(ckpt)) as tmp:
            os.makedirs(tmp)
    monkeypatch.undo()
    assert os.listdir(ckpt) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["ckpt", "x.json"]
    with pytest.raises(OSError, match=r"nowhere/m.jsonl: cannot append to it"):
        common.append_jsonl(str(tmp_path / "nowhere" / "m.jsonl"), [{"step": 1}])


def test_an_output_inside_an_input_is_refused_through_symlinks_and_relative_paths(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    for out in ("model", "model/sub", "link", "link/x", "./model/../model/", str(model)):
        with pytest.raises(DataError, match=f"--out {re.escape(out)} would overwrite --model model"):
            common.check_outputs([("--out", out)], [("--model", "model")])
    common.check_outputs([("--out", "models"), ("--out", str(tmp_path))], [("--model", "model"), ("--adapter", None)])


# ---- branches and batches ---------------------------------------------------------------


@dataclass
class Settings:
    max_len: int = 8  # tokens per branch
    rate: float = 0.5  # a rate of 50%
    full: bool = False  # a switch


def test_flags_come_from_the_dataclass_with_the_fields_comments_as_help():
    p = argparse.ArgumentParser()
    common.add_config_args(p, Settings)
    assert common.config_from_args(Settings, p.parse_args([])) == Settings()
    got = common.config_from_args(Settings, p.parse_args(["--max-len", "3", "--rate", "2", "--full"]))
    assert got == Settings(max_len=3, rate=2.0, full=True)
    text = p.format_help()
    assert "tokens per branch (default: 8)" in text and "a rate of 50% (default: 0.5)" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--max-len", "x"])


def test_derive_seed_is_a_pure_63_bit_function_of_its_parts():
    import hashlib
    want = int.from_bytes(hashlib.sha256(b"0\x005\x001").digest()[:8], "little") >> 1
    assert common.derive_seed(0, 5, 1) == want < 2**63
    assert common.derive_seed(0, 5, 1) != common.derive_seed(0, 51)  # parts are separated


def test_duration_reads_minutes_then_hours():
    assert common.duration(65.9) == "1m05s"
    assert common.duration(3 * 3600 + 125) == "3h02m"
