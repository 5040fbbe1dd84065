"""Inside the running miner: the periodic health check, GET /health for monitors and GET /metrics for
Prometheus (miner/metrics.py), on health.port.

The report itself (what is healthy, the table, the JSON) is miner/health.py.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from backends.chain import Chain
from miner.config import Config
from miner.errors import ConfigError
from miner.health import LOOPBACK, STATE_WORDS, Check, HealthReport, axon_state

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: _HealthHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if path == "/metrics" and self.server.metrics_fn is not None:
            try:
                body = self.server.metrics_fn()
            except Exception as e:  # a scrape must fail loudly, never take the health server down
                log.exception("building /metrics failed")
                self._send(500, {"error": f"building /metrics failed: {e}"})
                return
            self._send_bytes(200, body, CONTENT_TYPE_LATEST)
            return
        if path != "/health":
            self._send(404, {"error": "GET /health and GET /metrics are served here"})
            return
        try:
            report = self.server.report_fn()
        except Exception as e:  # a broken report must read as down, never as healthy
            log.exception("building the health report failed")
            report = HealthReport.down(f"the health report failed: {e}", "-", f"running miner (pid {os.getpid()})")
        self._send(503 if report.status == "down" else 200, report.to_json())

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        self._send_bytes(code, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json")

    def _send_bytes(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep monitors' polling out of the log
        log.debug("health http: " + format, *args)


class _HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    report_fn: Callable[[], HealthReport]
    metrics_fn: Callable[[], bytes] | None


class HealthServer:
    """GET /health on host:port (port 0: any free port, see .port): 200 healthy/degraded, 503 down; and
    GET /metrics when metrics_fn is given."""

    def __init__(self, host: str, port: int, report_fn: Callable[[], HealthReport],
                 metrics_fn: Callable[[], bytes] | None = None):
        try:
            self._server = _HealthHTTPServer((host, port), _Handler)
        except OSError as e:
            raise ConfigError(f"health.port {port}: cannot listen on {host}:{port} ({e.strerror}); set "
                              f"health.port to a free port, or 0 to turn GET /health off") from None
        self._server.report_fn = report_fn
        self._server.metrics_fn = metrics_fn
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


class HealthMonitor:
    """Re-checks the backends every health.interval_s (rebuilding ones that could not be built, so a
    model file put back heals without a restart), logs changes of state, and serves the report on
    GET /health when health.port is set. `checks` adds rows of the miner's own (the protocol validators
    send; chain mode: reachability), `sections` the report's earnings and recent answers, and `metrics`
    the body of GET /metrics."""

    def __init__(self, config: Config, chain: Chain, axon: tuple[str, int], source: str = "the running miner's config",
                 checks: Callable[[], tuple[Check, ...]] | None = None,
                 sections: Callable[[], dict[str, Any]] | None = None, metrics: Callable[[], bytes] | None = None):
        self.config, self.chain, self.axon, self.source = config, chain, axon, source
        self.checks = checks or (lambda: ())
        self.sections = sections or (lambda: {})
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-check", daemon=True)
        self._last: HealthReport | None = None
        self.server: HealthServer | None = None

    def report(self) -> HealthReport:
        return HealthReport.of(self.chain.snapshot(), axon_state(*self.axon, expected=True), self.source,
                               f"running miner (pid {os.getpid()})", self.checks(), **self.sections())

    def check_now(self) -> HealthReport:
        self.chain.probe(rebuild=True)
        report = self.report()
        self._log_changes(report)
        return report

    def _log_changes(self, report: HealthReport) -> None:
        before = {b.name: b.ok for b in self._last.backends} if self._last else {}
        for b in report.backends:
            if before.get(b.name) != b.ok:
                level = logging.INFO if b.ok else logging.WARNING
                log.log(level, "backend %s is %s: %s", b.name, STATE_WORDS[b.ok], b.detail)
        checked = {c.name: c.ok for c in self._last.checks} if self._last else {}
        for c in report.checks:
            if c.ok is not None and checked.get(c.name) != c.ok:
                log.log(logging.INFO if c.ok else logging.WARNING, "%s: %s", c.name, c.detail)
        if self._last is None or report.status != self._last.status:
            level = logging.INFO if report.status == "healthy" else logging.WARNING
            log.log(level, "health: %s (%s)", report.status, report.summary)
        self._last = report

    def _loop(self) -> None:
        while not self._stop.wait(self.config.health.interval_s):
            try:
                self.check_now()
            except Exception:  # keep checking: one broken round must not end health monitoring
                log.exception("health check failed")

    def start(self) -> None:
        if self.config.health.port:
            self.server = HealthServer(LOOPBACK, self.config.health.port, self.report, self.metrics)
        self.check_now()
        self._thread.start()
        if self.server is not None:
            self.server.start()
            log.info("health: GET http://%s:%d/health, metrics: GET /metrics", LOOPBACK, self.server.port)

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        if self._thread.is_alive():
            self._thread.join()  # it may be mid-check: the backends must not be closed under it
