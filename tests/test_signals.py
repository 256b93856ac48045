"""Real signals to real child processes: what a stopped, killed or interrupted run leaves behind.

Each child converts the tiny Flux file with a progress callback that pauses it mid-write (its
temp file exists and is half full), so the signal always arrives during the work.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from quant_core.cli import main
from quant_core.convert import ConvertOptions, convert_file

ROOT = Path(__file__).resolve().parents[1]
PAUSED_CLI = """
import pathlib, sys, time
import quant_core.cli as cli

class Paused:
    def __init__(self, label):
        pass

    def __call__(self, report):
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(120)

    def activity(self, activity):  # the tensor being rounded: not shown
        return None

cli.ProgressBar = Paused
sys.exit(cli.main(sys.argv[2:]))
"""
# ComfyUI runs prompts on a daemon thread; Ctrl-C ends its main thread, which logs and returns
SERVER = """
import pathlib, sys, threading, time
from quant_core.cli import main
from quant_core.convert import ConvertOptions, convert_file

def paused(report):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(120)

worker = threading.Thread(
    target=convert_file,
    args=(sys.argv[2], sys.argv[3], ConvertOptions(rounding="nearest")),
    kwargs={"progress": paused},
    daemon=True,
)
worker.start()
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("Stopped server")
"""
IMPORT_INTERRUPTED = """
import runpy, sys

class CtrlC:  # a Ctrl-C that arrives while torch is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
sys.argv = ["quant_core", "--version"]
runpy.run_module("quant_core", run_name="__main__", alter_sys=True)
"""


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def paused_children(script: str, *runs: tuple[Path, list[str]]) -> list[subprocess.Popen]:
    """Start ``script`` once per ``(ready_file, args)``, all at once (each imports torch: seconds),
    and return once each is paused in the middle of writing its output."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ready), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for ready, args in runs
    ]
    deadline = time.monotonic() + 120
    for child, (ready, _) in zip(children, runs, strict=True):
        while not ready.exists():
            if child.poll() is not None:
                raise AssertionError(child.communicate())
            assert time.monotonic() < deadline, "a child never reached its first tensor"
            time.sleep(0.05)
    return children


def cli_args(source: Path, output: Path) -> list[str]:
    return ["--input", str(source), "--output", str(output), "--rounding", "nearest"]


def test_termination_signals_leave_nothing_and_say_so(flux_file, tmp_path):
    signals = (signal.SIGTERM, signal.SIGHUP)
    folders = [tmp_path / signum.name for signum in signals]
    runs = []
    for folder in folders:
        folder.mkdir()
        runs.append((tmp_path / f"{folder.name}.ready", cli_args(flux_file, folder / "x.safetensors")))
    children = paused_children(PAUSED_CLI, *runs)
    for child, signum, folder in zip(children, signals, folders, strict=True):
        assert len(hidden(folder)) == 1  # the temp file, half written
        child.send_signal(signum)
    for child, signum, folder in zip(children, signals, folders, strict=True):
        _, err = child.communicate(timeout=60)
        assert child.returncode == 128 + signum
        assert f"stopped by {signum.name}" in err.decode() and "Traceback" not in err.decode()
        assert list(folder.iterdir()) == []


def test_a_killed_runs_temp_file_is_removed_and_a_running_ones_is_kept(flux_file, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    killed, running = paused_children(
        PAUSED_CLI,
        (tmp_path / "killed", cli_args(flux_file, out / "killed.safetensors")),
        (tmp_path / "running", cli_args(flux_file, out / "running.safetensors")),
    )
    try:
        temps = hidden(out)
        assert len(temps) == 2
        killed.kill()
        killed.communicate(timeout=60)
        with caplog.at_level(logging.WARNING, logger="quant_core"):
            convert_file(flux_file, out / "next.safetensors", ConvertOptions(rounding="nearest"))
        in_progress = [name for name in temps if name.startswith(".running")]
        assert hidden(out) == in_progress  # the killed run's file went, the running one's stayed
        assert "removed 1 temp file" in caplog.text
    finally:
        running.kill()
        running.communicate(timeout=60)


def test_a_server_stopped_mid_conversion_leaves_no_temp_file(flux_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (server,) = paused_children(SERVER, (tmp_path / "ready", [str(flux_file), str(out / "x.safetensors")]))
    assert len(hidden(out)) == 1
    server.send_signal(signal.SIGINT)
    stdout, _ = server.communicate(timeout=60)
    assert b"Stopped server" in stdout
    assert list(out.iterdir()) == []


def test_ctrl_c_while_torch_imports_prints_no_traceback():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_INTERRUPTED], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr


def test_signals_are_exceptions_only_inside_the_cli(flux_file, tmp_path):
    """The engine installs no handler of its own (a host application keeps its signal handling),
    and the command line puts back the handlers it found."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    convert_file(flux_file, tmp_path / "x.safetensors", ConvertOptions(rounding="nearest"))
    assert {s: signal.getsignal(s) for s in before} == before
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
