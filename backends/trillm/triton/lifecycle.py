"""How a model's stub process lives and dies with the server that started it.

* **Parent watch**: tritonserver starts one stub process per model instance.
  When tritonserver dies without stopping them (SIGKILL, the OOM killer, or
  the launcher's death taking it down), a stub is re-parented and would live
  on, holding memory and the model. Each model calls :func:`watch_parent` in
  ``initialize``: a daemon thread that ends the stub once its parent changes.
  (Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the stub
  exits, and tritonserver forks stubs from loader threads.)
* **Drain**: on SIGTERM the launcher writes a drain file (its path is in
  ``TRILLM_DRAIN_FILE``) holding the wall-clock deadline of the drain, then
  asks tritonserver to stop. The engine host reads it (:func:`drain_deadline`)
  to refuse new requests at once and end those still running at the deadline
  with a named error, before tritonserver's own exit timeout would cut them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

DRAIN_FILE_ENV = "TRILLM_DRAIN_FILE"
WATCH_PARENT_ENV = "TRILLM_WATCH_PARENT"  # set by trillm's launcher; elsewhere (tests, other launchers) no watch

_watching = False


def watch_parent(period: float = 0.5) -> None:
    """End this process (SIGKILL) once it is re-parented, i.e. its server has died.

    Only under trillm's launcher (``TRILLM_WATCH_PARENT=1``); idempotent.
    """
    global _watching
    if _watching or os.environ.get(WATCH_PARENT_ENV) != "1":
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="trillm-parent-watch", daemon=True).start()


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
