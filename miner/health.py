"""Health: what state the miner is in, for the operator and for pm2, systemd, docker or an uptime monitor.

healthy (exit 0): the first backend in YAML order can serve. degraded (exit 1): only a fallback can.
down (exit 2): no backend can serve, the config is broken, or a running miner's axon does not answer.

`python -m miner health [--json] [--config FILE]` asks the running miner first (GET /health on
127.0.0.1:health.port), so a health check never loads a second copy of the model into VRAM. When no
miner answers, it checks the config's backends itself: model file and GGUF header, GPU offload when
layers are asked for, a tiny real generation; API key present and a cheap real call.
The running miner re-checks every health.interval_s, logs changes, and serves the same report.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from backends.base import Health
from backends.chain import BackendState, Chain
from miner.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ANY_HOST = ("0.0.0.0", "", "::")
STATUS_EXIT = {"healthy": 0, "degraded": 1, "down": 2}
STATE_WORDS = {True: "ok", False: "down", None: "-"}
CONNECT_TIMEOUT_S = 2.0
Report = dict[str, Any]


def _gpu_offload_problem(settings: Any) -> str | None:
    """llama.cpp silently runs on the CPU when its build has no GPU support: say so when layers were asked."""
    if settings.n_gpu_layers in ("auto", 0):
        return None
    import llama_cpp
    if llama_cpp.llama_supports_gpu_offload():
        return None
    return (f"n_gpu_layers is {settings.n_gpu_layers} but this llama-cpp-python build cannot offload to a GPU; "
            f"reinstall it with CUDA (CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir "
            f"llama-cpp-python) or set n_gpu_layers: 0")


# Checks beyond Backend.health(), by backend type: each returns a problem or None.
EXTRA_CHECKS: dict[str, Callable[[Any], str | None]] = {"llama_cpp": _gpu_offload_problem}


def probe(chain: Chain, *, rebuild: bool) -> None:
    """Check every backend (the chain's own checks, then the extra ones) and let the chain act on it."""
    chain.probe(rebuild=rebuild)
    for state in chain.states:
        extra = EXTRA_CHECKS.get(state.type)
        problem = extra(state.settings) if extra and state.backend is not None and state.settings else None
        if problem:
            chain.mark_down(state, problem)


def _backend_row(state: BackendState, now: float) -> dict[str, Any]:
    health = state.health or Health(state.backend is not None, state.build_error or "not checked yet")
    cooling = max(state.cooldown_until - now, 0.0)
    detail = health.detail
    if cooling and health.ok:
        detail = f"skipped for {cooling:.0f} s after failing: {state.last_error}"
    return {"name": state.label, "type": state.type, "mode": state.mode, "ok": state.usable(now),
            "detail": detail, "cooling_down_s": round(cooling, 1), "served": state.served}


def axon_row(host: str, port: int, expected: bool) -> dict[str, Any]:
    """A TCP connect to the axon. expected=False (no running miner found): informational only."""
    host = LOOPBACK if host in ANY_HOST else host  # bound to every interface: loopback reaches it
    address = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            listening = True
    except OSError as e:
        listening, why = False, e.strerror or str(e)
    if expected:
        return {"address": address, "ok": listening,
                "detail": "accepting connections" if listening else f"not accepting connections ({why})"}
    return {"address": address, "ok": None,
            "detail": "something listens there, but no miner answered GET /health" if listening else "not running"}


def summarize(backends: list[dict[str, Any]], axon: dict[str, Any], config: str, checked_by: str) -> Report:
    usable = [b for b in backends if b["ok"]]
    if not usable:
        status, summary = "down", "no backend can serve"
    elif axon["ok"] is False:
        status, summary = "down", f"the axon at {axon['address']} does not accept connections"
    elif backends[0]["ok"]:
        status, summary = "healthy", f"serving on {usable[0]['name']}"
    else:
        status, summary = "degraded", f"serving on fallback {usable[0]['name']} ({backends[0]['name']} is down)"
    return {"status": status, "exit_code": STATUS_EXIT[status], "summary": summary,
            "serving": usable[0]["name"] if usable else None, "config": config, "checked_by": checked_by,
            "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backends": backends, "axon": axon}


def chain_report(chain: Chain, axon: dict[str, Any], config: str, checked_by: str) -> Report:
    now = time.monotonic()
    return summarize([_backend_row(s, now) for s in chain.states], axon, config, checked_by)


def config_error_report(error: str, config: str) -> Report:
    report = summarize([], {"address": "-", "ok": None, "detail": "not checked"}, config, "health command")
    report["summary"] = f"the config cannot be used: {error}"
    return report


def check(config: Config, source: str = "defaults") -> Report:
    """Build the config's backends here, check each, and release them (no running miner involved)."""
    chain = Chain.from_config(config.backends, config.chain, require_one=False)
    try:
        probe(chain, rebuild=False)
        axon = axon_row(config.axon.ip, config.axon.port, expected=False)
        if config.health.port == 0:
            axon["detail"] += " (health.port is 0, so a running miner cannot be asked)"
        return chain_report(chain, axon, source, "health command")
    finally:
        chain.close()


def fetch_running(port: int, timeout: float) -> Report | None:
    """The running miner's own report from GET /health, or None when none answers there."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:  # 503 means "down" and still carries the report
        body = e.read()
    except (urllib.error.URLError, OSError):
        return None
    try:
        report = json.loads(body)
    except json.JSONDecodeError:
        return None
    return report if isinstance(report, dict) and report.get("status") in STATUS_EXIT else None


class _Handler(BaseHTTPRequestHandler):
    server: _HealthHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/health":
            self._send(404, {"error": "only GET /health is served here"})
            return
        try:
            report = self.server.report_fn()
        except Exception as e:  # a broken report must read as down, never as healthy
            log.exception("building the health report failed")
            report = {"status": "down", "exit_code": 2, "summary": f"the health report failed: {e}"}
        self._send(503 if report["status"] == "down" else 200, report)

    def _send(self, code: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep monitors' polling out of the log
        log.debug("health http: " + format, *args)


class _HealthHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    report_fn: Callable[[], Report]


class HealthServer:
    """GET /health on host:port (port 0: any free port, see .port): 200 healthy/degraded, 503 down."""

    def __init__(self, host: str, port: int, report_fn: Callable[[], Report]):
        try:
            self._server = _HealthHTTPServer((host, port), _Handler)
        except OSError as e:
            raise ConfigError(f"health.port {port}: cannot listen on {host}:{port} ({e.strerror}); set "
                              f"health.port to a free port, or 0 to turn GET /health off") from None
        self._server.report_fn = report_fn
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
    """Inside the running miner: re-checks the backends every health.interval_s (rebuilding ones that
    could not be built, so a model file put back heals without a restart), logs changes of state, and
    serves the report on GET /health when health.port is set."""

    def __init__(self, config: Config, chain: Chain, axon: tuple[str, int], source: str = "the running miner's config"):
        self.config, self.chain, self.axon, self.source = config, chain, axon, source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-check", daemon=True)
        self._last: dict[str, Any] | None = None
        self.server: HealthServer | None = None

    def report(self) -> Report:
        return chain_report(self.chain, axon_row(*self.axon, expected=True), self.source,
                            f"running miner (pid {os.getpid()})")

    def check_now(self) -> Report:
        probe(self.chain, rebuild=True)
        report = self.report()
        self._log_changes(report)
        return report

    def _log_changes(self, report: Report) -> None:
        last = self._last or {"status": None, "backends": []}
        before = {b["name"]: b["ok"] for b in last["backends"]}
        for b in report["backends"]:
            if before.get(b["name"]) != b["ok"]:
                level = logging.INFO if b["ok"] else logging.WARNING
                log.log(level, "backend %s is %s: %s", b["name"], STATE_WORDS[b["ok"]], b["detail"])
        if report["status"] != last["status"]:
            level = logging.INFO if report["status"] == "healthy" else logging.WARNING
            log.log(level, "health: %s (%s)", report["status"], report["summary"])
        self._last = report

    def _loop(self) -> None:
        while not self._stop.wait(self.config.health.interval_s):
            try:
                self.check_now()
            except Exception:  # keep checking: one broken round must not end health monitoring
                log.exception("health check failed")

    def start(self) -> None:
        if self.config.health.port:
            self.server = HealthServer(LOOPBACK, self.config.health.port, self.report)
        self.check_now()
        self._thread.start()
        if self.server is not None:
            self.server.start()
            log.info("health: GET http://%s:%d/health", LOOPBACK, self.server.port)

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
        if self._thread.is_alive():
            self._thread.join()  # it may be mid-check: the backends must not be closed under it


def render(report: Report) -> str:
    """The short human table."""
    lines = [f"{report['status'].upper()} (exit {report['exit_code']}): {report['summary']}",
             f"config: {report['config']}; checked by {report.get('checked_by', '?')} "
             f"at {report.get('checked_at', '?')}"]
    rows = [("BACKEND", "TYPE", "MODE", "STATE", "DETAIL")]
    rows += [(b["name"], b["type"], b["mode"], STATE_WORDS[b["ok"]], b["detail"]) for b in report.get("backends", [])]
    axon = report.get("axon", {})
    rows.append(("axon", "", "", STATE_WORDS[axon.get("ok")], f"{axon.get('address', '-')}: {axon.get('detail', '')}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[4]) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m miner health", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a running miner's GET /health")
    args = parser.parse_args(argv)
    source = str(args.config) if args.config else "defaults"
    try:
        config = load_config(args.config)
    except ConfigError as e:
        report = config_error_report(str(e), source)
    else:
        running = fetch_running(config.health.port, args.wait) if config.health.port else None
        report = running or check(config, source)
    sys.stdout.write((json.dumps(report, ensure_ascii=False, indent=2) if args.json else render(report)) + "\n")
    return report["exit_code"]
