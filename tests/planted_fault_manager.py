"""``python -m tests.planted_fault_manager --config ...``: the real manager with one fault planted (``MM_PLANT``), for
the tests that prove its guards hold.

- ``error_path`` (the default): answering an error to a request whose id starts with ``plant-`` raises, as a bug in
  an error path would (the apology, an ``internal`` error, still goes).
- ``shutdown_hang``: ending the workers at shutdown never returns, as a worker stuck in the kernel would make it.
"""

from __future__ import annotations

import os
import sys
import threading

from model_client.errors import InternalError
from model_manager import broker, pool
from model_manager.__main__ import main

PLANTED_PREFIX = "plant-"


def plant_error_path() -> None:
    answer_error = broker.ModelManagerAgent._reply_error

    def failing(self, route, request_id, error):  # noqa: ANN001, ANN202 - the method it stands in for
        if request_id and request_id.startswith(PLANTED_PREFIX) and not isinstance(error, InternalError):
            raise RuntimeError("planted: a fault while answering an error")
        return answer_error(self, route, request_id, error)

    broker.ModelManagerAgent._reply_error = failing


def plant_shutdown_hang() -> None:
    def hanging_close(self, grace_s):  # noqa: ANN001, ANN202, ARG001 - the method it stands in for
        threading.Event().wait()  # planted: never returns

    pool.WorkerPool.close = hanging_close


if __name__ == "__main__":
    {"error_path": plant_error_path, "shutdown_hang": plant_shutdown_hang}[os.environ.get("MM_PLANT", "error_path")]()
    sys.exit(main())
