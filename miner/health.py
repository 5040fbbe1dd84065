"""Health: what state the miner is in, for the operator and for pm2, systemd, docker or an uptime monitor.

healthy (exit 0): the first backend in YAML order can serve. degraded (exit 1): only a fallback can,
the first one serves but names something to fix (its GPU memory grown past the plan, GPU offload lost),
validators send a protocol the miner does not speak or have requests refused before an answer, or (chain
mode) validators cannot reach the miner. down (exit 2): no backend can serve, the config is broken, or a
running miner's axon does not answer.

`python -m miner health [--json] [--config FILE]` asks the running miner first (GET /health on
127.0.0.1:health.port), so a health check never loads a second copy of the model into VRAM. When no
miner answers, it checks the config's backends itself: model file and GGUF header, GPU offload when
layers are asked for, a tiny real generation; API key present and a cheap real call.
The running miner re-checks every health.interval_s, logs changes, and serves the same report
(miner/health_monitor.py). Each backend checks its own settings in its health() (backends/).
`--running` (for watchdogs) asks only the running miner: none answering is down, and nothing is loaded.
A running miner adds the protocol versions validators send, the requests refused before an answer and
its last ten minutes (miner/activity.py); on the chain, its reachability (miner/reachability.py: the axon
the chain advertises for its hotkey against the one it serves, whether validators' requests arrive) and
its earnings (miner/earnings.py). docs/monitoring.md shows the report.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backends.chain import BackendStatus, Chain
from backends.llama_build import system_info
from miner.config import Config, load_config
from miner.earnings import Earnings
from miner.errors import ConfigError

LOOPBACK = "127.0.0.1"
ANY_HOST = ("0.0.0.0", "", "::")
STATUS_EXIT = {"healthy": 0, "degraded": 1, "down": 2}
STATE_WORDS = {True: "ok", False: "down", None: "-"}
CONNECT_TIMEOUT_S = 2.0
EXIT_CODES = """exit codes:
  0  healthy: the first backend in the YAML serves
  1  degraded: only a fallback serves, the first backend names something to fix (GPU memory, GPU offload),
     validators cannot reach the miner, or they send a protocol it does not speak (alert, do not restart;
     the report says what to fix)
  2  down: no backend can serve, the config is broken, the axon does not accept connections, or with
     --running no running miner answered (restart)"""


@dataclass(frozen=True)
class AxonState:
    address: str
    ok: bool | None  # None: not judged (no running miner was found to own it)
    detail: str


NOT_CHECKED = AxonState("-", None, "not checked")


@dataclass(frozen=True)
class Check:
    """One more thing the running miner judges, a row of the report: False degrades it, and the summary
    says the concern."""
    name: str
    ok: bool | None
    detail: str
    concern: str = "validators may not reach it"


@dataclass(frozen=True)
class HealthReport:
    status: str  # healthy, degraded or down
    summary: str
    serving: str | None
    config: str
    checked_by: str
    checked_at: str
    backends: tuple[BackendStatus, ...]
    axon: AxonState
    build: str  # the llama.cpp build's features where the report was made: a crash report needs them
    checks: tuple[Check, ...] = ()
    earnings: dict[str, Any] | None = None  # chain mode: miner/earnings.py
    recent: dict[str, Any] | None = None  # a running miner's last minutes: miner/activity.py

    @property
    def exit_code(self) -> int:
        return STATUS_EXIT[self.status]

    @classmethod
    def of(cls, backends: list[BackendStatus], axon: AxonState, config: str, checked_by: str,
           checks: tuple[Check, ...] = (), earnings: dict[str, Any] | None = None,
           recent: dict[str, Any] | None = None) -> HealthReport:
        usable = [b for b in backends if b.ok]
        failing = [c for c in checks if c.ok is False]
        failed = [c.name for c in failing]
        if not usable:
            status, summary = "down", "no backend can serve"
        elif axon.ok is False:
            status, summary = "down", f"the axon at {axon.address} does not accept connections"
        elif backends[0].ok and not failed and not backends[0].degraded:
            status, summary = "healthy", f"serving on {usable[0].name}"
        elif backends[0].ok:
            status = "degraded"
            concerns = " and ".join(dict.fromkeys(c.concern for c in failing))
            why = [f"{backends[0].name}: {backends[0].detail}"] if backends[0].degraded else []
            why += [f"{concerns}: see {' and '.join(failed)} below"] if failing else []
            summary = f"serving on {usable[0].name}, but " + "; and ".join(why)
        else:
            status, summary = "degraded", f"serving on fallback {usable[0].name} ({backends[0].name} is down)"
        return cls(status, summary, usable[0].name if usable else None, config, checked_by,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"), tuple(backends), axon, system_info(),
                   tuple(checks), earnings, recent)

    @classmethod
    def down(cls, summary: str, config: str, checked_by: str) -> HealthReport:
        """A report that could not look at the backends (a broken config, a failed check)."""
        return replace(cls.of([], NOT_CHECKED, config, checked_by), summary=summary)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}

    @classmethod
    def from_json(cls, data: Any) -> HealthReport:
        """Read a report another process served; ValueError when it is not one."""
        try:
            if data["status"] not in STATUS_EXIT:
                raise ValueError(f"unknown status {data['status']!r}")
            return cls(data["status"], data["summary"], data["serving"], data["config"], data["checked_by"],
                       data["checked_at"], tuple(BackendStatus(**b) for b in data["backends"]),
                       AxonState(**data["axon"]), data.get("build", "unknown"),
                       tuple(Check(**c) for c in data.get("checks", ())), data.get("earnings"), data.get("recent"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a health report: {type(e).__name__}: {e}") from None

    def render(self) -> str:
        """The short human table."""
        lines = [f"{self.status.upper()} (exit {self.exit_code}): {self.summary}",
                 f"config: {self.config}; checked by {self.checked_by} at {self.checked_at}",
                 f"llama.cpp build: {self.build}"]
        # SERVED and BUSY count requests since the miner started: answered, and refused for load (not failed).
        rows = [("BACKEND", "TYPE", "MODE", "STATE", "SERVED", "BUSY", "DETAIL")]
        rows += [(b.name, b.type, b.mode, "degraded" if b.ok and b.degraded else STATE_WORDS[b.ok], b.served, b.busy,
                  b.detail) for b in self.backends]
        rows.append(("axon", "", "", STATE_WORDS[self.axon.ok], "", "", f"{self.axon.address}: {self.axon.detail}"))
        rows += [(c.name, "", "", STATE_WORDS[c.ok], "", "", c.detail) for c in self.checks]
        lines += _table(rows)
        if self.earnings is not None:
            lines += ["", *_table([("EARNINGS", "this hotkey's row of the metagraph")] + Earnings(**self.earnings).rows())]
        if self.recent is not None:
            lines += ["", *_recent_table(self.recent)]
        return "\n".join(lines)


def _table(rows: list[tuple[Any, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    return [("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1])).rstrip() for r in rows]


def _recent_table(recent: dict[str, Any]) -> list[str]:
    """The last window's answers per task, each figure beside the window before's in brackets."""
    minutes = f"{recent['window_s'] / 60:g} min"
    columns = (("SERVED", "served"), ("BUSY", "busy"), ("ERRORS", "errors"), ("P50 S", "p50_s"), ("P95 S", "p95_s"))
    rows = [(f"LAST {minutes} (the {minutes} before)", *(name for name, _ in columns))]
    for task, windows in recent["tasks"].items():
        rows.append((task, *(f"{_figure(windows['now'][key])} ({_figure(windows['before'][key])})"
                             for _, key in columns)))
    tokens = recent["tokens_per_s"]
    rows.append(("tokens a second", f"{tokens['now']} ({tokens['before']})", "", "", "", ""))
    return _table(rows)


def _figure(value: Any) -> str:
    return "-" if value is None else str(value)


def axon_state(host: str, port: int, expected: bool) -> AxonState:
    """A TCP connect to the axon. expected=False (no running miner found): informational only."""
    host = LOOPBACK if host in ANY_HOST else host  # bound to every interface: loopback reaches it
    address = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            listening = True
    except OSError as e:
        listening, why = False, e.strerror or str(e)
    if expected:
        return AxonState(address, listening,
                         "accepting connections" if listening else f"not accepting connections ({why})")
    return AxonState(address, None,
                     "something listens there, but no miner answered GET /health" if listening else "not running")


def check(config: Config, source: str = "defaults") -> HealthReport:
    """Build the config's backends here, check each, and release them (no running miner involved)."""
    chain = Chain.from_config(config.backends, config.chain, require_one=False)
    try:
        chain.probe(rebuild=False)
        axon = axon_state(config.axon.ip, config.axon.port, expected=False)
        if config.health.port == 0:
            axon = replace(axon, detail=axon.detail + " (health.port is 0, so a running miner cannot be asked)")
        return HealthReport.of(chain.snapshot(), axon, source, "health command")
    finally:
        chain.close()


def fetch_running(port: int, timeout: float) -> HealthReport | None:
    """The running miner's own report from GET /health, or None when none answers there."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:  # 503 means "down" and still carries the report
        body = e.read()
    except (urllib.error.URLError, OSError):
        return None
    try:
        return HealthReport.from_json(json.loads(body))
    except ValueError:  # not JSON, or not a report: something else listens on that port
        return None


def _not_running(port: int, wait: float) -> str:
    if not port:
        return "--running asks the running miner's GET /health, but health.port is 0 in the config; set it"
    return f"no running miner answered GET http://{LOOPBACK}:{port}/health within {wait:g} s"


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (default: built-in defaults)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds to wait for a running miner's GET /health")
    parser.add_argument("--running", action="store_true", help="ask only the running miner (for watchdogs): "
                        "no answer is down (exit 2); the backends are never built here")


def command(args: argparse.Namespace) -> int:
    """Is the miner serving: the config, each backend, a running miner's own report."""
    source = str(args.config) if args.config else "defaults"
    try:
        config = load_config(args.config)
    except ConfigError as e:
        report = HealthReport.down(f"the config cannot be used: {e}", source, "health command")
    else:
        running = fetch_running(config.health.port, args.wait) if config.health.port else None
        if running is None and args.running:
            report = HealthReport.down(_not_running(config.health.port, args.wait), source, "health command")
        else:
            report = running or check(config, source)
    out = json.dumps(report.to_json(), ensure_ascii=False, indent=2) if args.json else report.render()
    sys.stdout.write(out + "\n")
    return report.exit_code
