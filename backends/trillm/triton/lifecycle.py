"""How a model's stub process lives and dies with the server that started it.

* **Parent watch**: tritonserver starts one stub process per model instance.
  When tritonserver dies without stopping them (SIGKILL, the OOM killer, or
  the launcher's death taking it down), a stub is re-parented and would live
  on, holding memory and the model. Each model calls :func:`watch_parent` in
  ``initialize``: a small watcher process that ends the stub once its parent
  changes.
  (Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the stub
  exits, and tritonserver forks stubs from loader threads.)
* **Drain**: on SIGTERM the launcher writes a drain file (its path is in
  ``TRILLM_DRAIN_FILE``) holding the wall-clock deadline of the drain. The
  engine host reads it (:func:`drain_deadline`), refuses new requests at once
  (UNAVAILABLE, "server shutting down"), lets those in flight finish, ends the
  ones still running at the deadline with that named error, and writes
  ``<drain file>.done.<pid>`` (:func:`mark_drained`) once none is left. Only then
  does the launcher send tritonserver SIGTERM: tritonserver 2.51, once
  stopping, refuses the step requests an ensemble makes for every streamed
  token, so a stream still running would hang until its exit timeout cuts the
  socket (measured), instead of finishing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

DRAIN_FILE_ENV = "TRILLM_DRAIN_FILE"
WATCH_PARENT_ENV = "TRILLM_WATCH_PARENT"  # set by trillm's launcher; elsewhere (tests, other launchers) no watch

_watching = False

# Kills the stub (by pid) once its parent pid changes, then exits; exits when the stub is gone.
# A process of its own: in a stub whose server died, a thread holding the GIL in a call into the
# dead server would keep a Python watcher thread from ever running (seen).
_WATCHER = """
while kill -0 "$1" 2>/dev/null; do
  ppid=$(cut -d' ' -f4 "/proc/$1/stat" 2>/dev/null) || exit 0
  if [ "$ppid" != "$2" ]; then kill -9 "$1"; exit 0; fi
  sleep "$3"
done
"""


def watch_parent(period: float = 0.5) -> None:
    """End this process (SIGKILL) once it is re-parented, i.e. its server has died.

    Only under trillm's launcher (``TRILLM_WATCH_PARENT=1``); idempotent.
    """
    global _watching
    if _watching or os.environ.get(WATCH_PARENT_ENV) != "1":
        return
    _watching = True
    subprocess.Popen(["/bin/sh", "-c", _WATCHER, "trillm-parent-watch", str(os.getpid()), str(os.getppid()),
                      str(period)], stdin=subprocess.DEVNULL, close_fds=True)


def write_drain_file(path: Path, timeout: float) -> None:
    """Tell the models to drain: refuse new requests, end the rest ``timeout`` seconds from now."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"deadline": time.time() + timeout}))
    tmp.replace(path)


def drain_deadline() -> float | None:
    """Seconds left until the drain deadline, if the launcher asked for a drain; else None."""
    name = os.environ.get(DRAIN_FILE_ENV)
    if not name:
        return None
    try:
        deadline = float(json.loads(Path(name).read_text())["deadline"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return deadline - time.time()


def drained_marker(path: Path, pid: int) -> Path:
    """The file engine host ``pid`` writes once it has drained."""
    return path.with_name(f"{path.name}.done.{pid}")


def mark_drained() -> None:
    """Tell the launcher this engine host has no request left in flight after a drain began."""
    name = os.environ.get(DRAIN_FILE_ENV)
    if name:
        drained_marker(Path(name), os.getpid()).touch()
