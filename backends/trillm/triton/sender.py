"""A decoupled request's response sender, safe to share between two threads.

The engine host and ``tensorrt_llm_bls`` send responses from one thread and
poll ``is_cancelled()`` from another. Triton 2.51's Python backend frees a
request's response factory once the final response is sent, and answers an
``is_cancelled()`` that arrives after that by reading the freed factory:
tritonserver crashes (seen under load while models were reloading). So the
two calls are serialised, and once the final response is on its way the
request counts as not cancelled without asking the server.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils


class GuardedSender:
    def __init__(self, sender) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self._final_sent = False

    def send(self, response=None, flags: int = 0) -> None:
        with self._lock:
            if flags & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self._final_sent = True
            self._sender.send(response, flags=flags)

    def is_cancelled(self) -> bool:
        with self._lock:
            return not self._final_sent and self._sender.is_cancelled()
