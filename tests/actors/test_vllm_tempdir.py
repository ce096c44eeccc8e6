"""The temp dir a vLLM engine start uses (``own_tempdir``): removed after the start, and the ones
of generators killed while starting are removed by the next start on the machine."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from rlfleet.actors.vllm_engine import OWN_TEMPDIR_PREFIX, own_tempdir


def test_a_start_removes_the_tempdirs_of_generators_that_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = tmp_path / f"{OWN_TEMPDIR_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{OWN_TEMPDIR_PREFIX}{os.getppid()}-def"
    for directory in (orphan, live):
        directory.mkdir()
        (directory / "vllm_dist_x").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    with own_tempdir():
        inside = Path(tempfile.gettempdir())
        assert inside.name.startswith(f"{OWN_TEMPDIR_PREFIX}{os.getpid()}-")
        (inside / "vllm_dist_y").write_text("")

    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
