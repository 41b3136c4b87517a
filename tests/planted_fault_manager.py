"""``python -m tests.planted_fault_manager --config ...``: the real manager with one fault planted, for the test that
proves its last guard holds. Answering an error to a request whose id starts with ``plant-`` raises, as a bug in an
error path would (the apology, an ``internal`` error, still goes)."""

from __future__ import annotations

import sys

from model_client.errors import InternalError
from model_manager import broker
from model_manager.__main__ import main

PLANTED_PREFIX = "plant-"


def plant() -> None:
    answer_error = broker.ModelManagerAgent._reply_error

    def failing(self, route, request_id, error):  # noqa: ANN001, ANN202 - the method it stands in for
        if request_id and request_id.startswith(PLANTED_PREFIX) and not isinstance(error, InternalError):
            raise RuntimeError("planted: a fault while answering an error")
        return answer_error(self, route, request_id, error)

    broker.ModelManagerAgent._reply_error = failing


if __name__ == "__main__":
    plant()
    sys.exit(main())
