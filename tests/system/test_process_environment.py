"""The process environment the commands really run in, which is not a developer's shell:
standard streams closed (`<&-`, `>&-`) or empty (`</dev/null` in CI), a working directory
removed under the shell. Each ends in one line naming the problem, never a traceback, and
an export leaves nothing behind."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

EDGE = [sys.executable, "-m", "edge_runtime"]


def run_in_shell(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`script` under /bin/sh, where `$EDGE` is the edge-runtime command (this interpreter)."""
    return subprocess.run(["/bin/sh", "-c", f"EDGE={shlex.quote(shlex.join(EDGE))}; {script}"],
                          capture_output=True, text=True, timeout=timeout)


def last_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr.strip().splitlines()[-1]


def test_messages_from_a_closed_or_empty_stdin_is_one_line():
    """`--messages -` with stdin closed (`<&-`) stopped with AttributeError ('NoneType' object has no
    attribute 'read'); from /dev/null it said "Expecting value: line 1 column 1". The missing
    bundle shows nothing was loaded."""
    closed = run_in_shell("$EDGE generate --bundle /nonexistent --messages - <&-")
    assert closed.returncode == 2
    assert last_line(closed) == "error: --messages -: standard input is closed: give the messages on it, or a file"
    empty = run_in_shell("$EDGE generate --bundle /nonexistent --messages - </dev/null")
    assert empty.returncode == 2
    assert last_line(empty).startswith("error: --messages -: empty: expected a JSON list"), empty.stderr
    asked = run_in_shell("$EDGE ask --broker mqtt://127.0.0.1:9 --device-id d --messages - <&-")
    assert asked.returncode == 2 and "standard input is closed" in last_line(asked), asked.stderr


def test_generate_and_ask_with_stdout_closed_stop_before_the_work():
    """`generate ... >&-` loaded the bundle, then stopped with AttributeError ('NoneType' object has
    no attribute 'write'); `ask` did so after sending the request. Now exit 1, as for a full disk,
    before the bundle is loaded (/nonexistent) or the broker called (nothing listens on port 9)."""
    for command in ("generate --bundle /nonexistent --prompt x", "ask --broker mqtt://127.0.0.1:9 --device-id d "
                                                                    "--prompt x"):
        out = run_in_shell(f"$EDGE {command} >&-")
        assert out.returncode == 1, (command, out.stderr)
        assert last_line(out) == "error: cannot write the output: standard output is closed (`>/dev/null` discards it)"


def test_export_from_a_removed_working_directory_is_refused_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """`cd build && rm -rf ../build` in another shell, then `export` with absolute paths: torch's
    oneMKL killed the process at the first matrix product ("Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so", exit 2) and left `OUTPUT.partial/` behind. Now refused before any work."""
    gone, output = tmp_path / "gone", tmp_path / "out" / "bundle"
    script = (f"mkdir {shlex.quote(str(gone))} && cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && "
              f"$EDGE export --checkpoint {shlex.quote(str(tiny_checkpoint))} --profile cpu-x86_64 --precision int8 "
              f"--skip-fidelity --output {shlex.quote(str(output))}")
    out = run_in_shell(script)
    assert out.returncode == 2, out.stderr
    assert "the current folder no longer exists" in last_line(out) and "cd to a folder that exists" in last_line(out)
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").iterdir())

