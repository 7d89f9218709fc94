"""pymilvus logs a failed RPC with its traceback; the index silences it only around the alias check, and
only in the thread making it."""

from __future__ import annotations

import logging
import threading

from shared.index import _quiet_pymilvus


def test_pymilvus_records_are_dropped_only_inside_the_quiet_block_of_this_thread(caplog):
    logger = logging.getLogger("pymilvus.decorators")
    caplog.set_level(logging.ERROR, logger="pymilvus.decorators")
    with _quiet_pymilvus():
        logger.error("RPC error: alias not found")
        thread = threading.Thread(target=logger.error, args=("another thread's error",))
        thread.start()
        thread.join()
    logger.error("after the block")
    assert [r.getMessage() for r in caplog.records] == ["another thread's error", "after the block"]
