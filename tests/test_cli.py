"""The ``vlmr`` dispatcher: errors a user causes are one line naming the path."""

from __future__ import annotations

import sys
import types

from tools import cli


def test_an_out_under_a_file_is_one_line_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code = cli.main(["synth", "--out", str(blocker / "world"), "--videos", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vlmr synth: error: ") and str(blocker / "world") in err
    assert "Not a directory" in err or "not a directory" in err.lower()


def test_an_os_error_without_a_path_is_one_line_too(monkeypatch, capsys):
    def full_disk(argv, prog):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(sys.modules, "fake_command", types.SimpleNamespace(main=full_disk))
    code = cli._dispatch(("fake_command", "main", ""), "fake", [])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == "vlmr fake: error: [Errno 28] No space left on device"
