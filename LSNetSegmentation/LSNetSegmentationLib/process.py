"""Run the engine CLI in a child process: command line, JSON progress, cancel (plain Python).

Slicer stays responsive because segmentation runs in ``PythonSlicer -m lsnet.app.cli segment ...``; a
reader thread queues the child's output lines and the GUI polls :meth:`SegmentationProcess.poll`
from a ``qt.QTimer``.  With ``--progress-json`` the CLI prints one JSON object per line on stdout:

    {"event": "progress", "done": k, "total": n}
    {"event": "boxes", "slice": k, "boxes": [RoiBox.to_dict(), ...]}
    {"event": "done", "outputs": {...}, "summary": {...}}   or   {"event": "error", "message": ...}

Every other line (stderr is merged) is a log line.  Cancel kills the whole process tree (the
``PythonSlicer`` launcher starts the real interpreter as a child, so killing only the launcher would
leave the computation running).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .i18n import _

OUTPUT_FILES = {
    "seg_nrrd": "segmentation.seg.nrrd",
    "heatmap": "heatmap.nrrd",
    "boxes_json": "boxes.json",
    "markups": "rois.mrk.json",
}
"""Files ``lsnet.io.outputs.write_outputs`` writes (keys as in ``lsnet.io.outputs.FILE_NAMES`` and in the
``outputs`` of the CLI's ``done`` event)."""


@dataclass
class ProcessEvent:
    kind: str  # "progress", "boxes", "done", "error" or "log"
    data: dict = field(default_factory=dict)
    text: str = ""


def find_python_executable() -> str:
    """``PythonSlicer`` when running inside Slicer (it sets up Slicer's Python environment), else
    the current interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def build_segment_command(python_executable: str, input_path, output_dir, weights: Optional[str] = None,
                          device: str = "auto", batch_size: int = 8, overwrite: bool = True,
                          drop_small_components: bool = True) -> list[str]:
    """Argument list of ``python -m lsnet.app.cli segment INPUT -o OUTDIR ... --progress-json``
    (``drop_small_components=False`` adds ``--all-components``)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    cmd = [str(python_executable), "-m", "lsnet.app.cli", "segment", str(input_path), "-o", str(output_dir),
           "--device", device, "--batch-size", str(int(batch_size)), "--progress-json"]
    if weights:
        cmd += ["--weights", str(weights)]
    if overwrite:
        cmd.append("--overwrite")
    if not drop_small_components:
        cmd.append("--all-components")
    return cmd


def child_environment(base_env: Optional[dict], engine_parent_dir) -> dict:
    """Environment for the child: the bundled engine importable, unbuffered UTF-8 output."""
    env = dict(os.environ if base_env is None else base_env)
    parts = [str(engine_parent_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def parse_line(line: str) -> ProcessEvent:
    """One output line -> event; anything that is not a JSON object with an ``event`` key is a log line."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            kind = obj["event"]
            if kind in ("progress", "boxes", "done", "error"):
                return ProcessEvent(kind, obj, text)
    return ProcessEvent("log", {}, text)


def progress_percent(done: int, total: int) -> int:
    if total <= 0:
        return 0
    return max(0, min(100, int(round(100.0 * done / total))))


def output_paths(output_dir, done_outputs: Optional[dict] = None) -> dict[str, Path]:
    """Paths of the result files: those named by the ``done`` event, else the standard names."""
    out = {}
    for key, name in OUTPUT_FILES.items():
        value = (done_outputs or {}).get(key)
        out[key] = Path(value) if value else Path(output_dir) / name
    return out


@dataclass
class Failure:
    message: str
    retry: Optional[dict] = None  # settings to retry with, e.g. {"batch_size": 4} or {"device": "cpu"}


def explain_failure(error_text: str, batch_size: int, device: str) -> Failure:
    """User message for a failed run and, for out-of-memory on the GPU, a retry suggestion."""
    text = error_text.strip() or _("The segmentation process failed without a message (see the log).")
    low = text.lower()
    if "out of memory" in low:
        if batch_size > 1:
            new = max(1, batch_size // 2)
            return Failure(_("The GPU ran out of memory. Retry with batch size {n}?").format(n=new), {"batch_size": new})
        if device != "cpu":
            return Failure(_("The GPU ran out of memory even with batch size 1. Retry on the CPU?"), {"device": "cpu"})
    return Failure(text)


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill a child started by :class:`SegmentationProcess` and everything it started.

    POSIX: the child leads its own process group (``start_new_session``), so the group is killed even
    when the launcher has already exited.  Windows: ``taskkill /T`` walks the tree.
    """
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.kill()


class SegmentationProcess:
    """A child process whose output lines are parsed into :class:`ProcessEvent` objects.

    Usage (Slicer polls from a QTimer; tests poll in a loop)::

        proc = SegmentationProcess(cmd, env=env); proc.start()
        while not proc.finished: events = proc.poll(); ...
    """

    def __init__(self, command: list[str], env: Optional[dict] = None, cwd=None):
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.cancelled = False
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._eof = False
        self.last_error: Optional[ProcessEvent] = None
        self.done_event: Optional[ProcessEvent] = None

    def start(self) -> None:
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                      cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":  # pragma: no cover - Windows only: no console window, own process group
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            kwargs["startupinfo"] = info
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(self.command, **kwargs)
        self._reader = threading.Thread(target=self._read, name="lsnet-output-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def poll(self) -> list[ProcessEvent]:
        """Events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                break
            event = parse_line(line)
            if event.kind == "error":
                self.last_error = event
            elif event.kind == "done":
                self.done_event = event
            events.append(event)
        return events

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """The child has exited and all of its output has been polled."""
        return self.proc is not None and self._eof and self.proc.poll() is not None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    @property
    def succeeded(self) -> bool:
        return self.finished and not self.cancelled and self.returncode == 0 and self.done_event is not None

    def cancel(self, timeout: float = 10.0) -> None:
        """Kill the process tree and wait for it to go away."""
        self.cancelled = True
        if self.proc is None:
            return
        kill_process_tree(self.proc)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - defensive
            self.proc.kill()
        if self._reader is not None:
            self._reader.join(timeout=timeout)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> list[ProcessEvent]:
        """Poll until finished (for scripts and tests); returns all events."""
        events = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"process did not finish within {timeout} s")
            time.sleep(interval)
        events += self.poll()
        return events

    def error_message(self) -> str:
        """Best message for a failed run: the CLI's error event, else the tail of the log."""
        if self.last_error is not None:
            return str(self.last_error.data.get("message", ""))
        return ""
