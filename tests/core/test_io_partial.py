"""An interrupted write leaves nothing the next run trips over.

Killed (SIGKILL: no cleanup can run), a writer leaves its hidden partial sibling; the next write of
the same name removes it. Terminated (SIGTERM) under the ``flexmoe`` command, the writer removes
its own. A partial sibling of a live process is never touched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from flexmoe.core.io import atomic_dir, atomic_write_text, remove_stale_partials


def partials(directory):
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def run(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` (a writer that signals itself mid-write) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


WRITER = """
    import os, signal
    from flexmoe.core.io import atomic_dir
    with atomic_dir({out!r}) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.{sig})
"""


def test_a_killed_writer_is_cleaned_up_by_the_next_write(tmp_path):
    out = tmp_path / "merged"
    done = run(WRITER.format(out=str(out), sig="SIGKILL"))
    assert done.returncode == -signal.SIGKILL
    assert len(partials(tmp_path)) == 1 and not out.exists()
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("whole")
    assert partials(tmp_path) == [] and (out / "model.safetensors").read_text() == "whole"


def test_sigterm_under_the_command_removes_the_partial_output(tmp_path):
    out = tmp_path / "merged"
    code = """
    from flexmoe.cli import _terminate_cleanly
    _terminate_cleanly()
""" + WRITER.format(out=str(out), sig="SIGTERM")
    done = run(code)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert partials(tmp_path) == [] and not out.exists()


def test_a_live_writer_is_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from flexmoe.core import io

        live = tmp_path / f".report.json.partial-{io._HOST}-{sleeper.pid}-{'0' * 12}"
        live.write_text("still writing")
        other_host = tmp_path / f".report.json.partial-{'f' * 8}-1-{'0' * 12}"
        other_host.write_text("another machine")
        assert remove_stale_partials(tmp_path / "report.json") == []
        atomic_write_text(tmp_path / "report.json", "done")
        assert live.exists() and other_host.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_partials(tmp_path / "report.json") == [live]
