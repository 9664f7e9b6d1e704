"""A memory server stopped before any worker registered leaves cleanly (exit 0, no traceback)."""

from __future__ import annotations

from tests.e2e.cluster import start_memserver, start_router, wait_for


def test_sigterm_while_waiting_for_the_kv_geometry_exits_cleanly(tmp_path):
    router = start_router(tmp_path)
    memserver = None
    try:
        memserver = start_memserver(tmp_path, router.url)
        wait_for(lambda: "waiting_for_kv_geometry" in memserver.log_text(), 60, "the memserver to wait for a worker",
                 [router, memserver])
        assert memserver.terminate(timeout=20) == 0, memserver.log_tail()
        log = memserver.log_text()
        assert "shutdown_requested" in log and "Traceback" not in log, log
    finally:
        if memserver is not None:
            memserver.kill()
        router.terminate()
