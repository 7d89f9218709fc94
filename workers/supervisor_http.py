"""The pod's /healthz, /readyz and /metrics while workers/supervisor.py runs several worker processes. Each is
asked of every worker at once, on the worker's own port on 127.0.0.1, and the answers are combined: probes
and Prometheus keep one port per pod, whatever the number of processes in it."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from shared import metrics
from workers.supervisor import Child, Supervisor

log = logging.getLogger(__name__)

# Under the probes' own timeouts (5 s liveness, 10 s readiness and startup: deploy/k8s/base/worker-deployment.yaml).
ASK_TIMEOUT_S = 4.0
# A worker still importing and starting Celery does not answer yet: its liveness counts as fine for this long
# (its own /healthz answers from then on, while the model loads; the startupProbe waits for that).
STARTING_GRACE_S = 600.0


def ask(port: int, path: str, timeout_s: float = ASK_TIMEOUT_S) -> tuple[int | None, bytes]:
    """(HTTP status, body) of a worker's endpoint; (None, the error) when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return None, str(exc).encode()


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]


class PodView:
    """What the supervisor serves: its workers' answers, combined."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._pool = ThreadPoolExecutor(max_workers=max(2, 3 * supervisor.processes), thread_name_prefix="pod-view")

    def _ask_all(self, path: str) -> list[tuple[Child, int | None, bytes]]:
        children = list(self.supervisor.children)
        answers = self._pool.map(lambda c: ask(c.port, path) if c.running and c.port else (None, b""), children)
        return [(child, status, body) for child, (status, body) in zip(children, answers)]

    def live(self) -> dict:
        """Live unless a running worker says it is not (a batch stuck past its limit), or stops answering once
        past its start-up. A worker waiting to be restarted is the supervisor's business: it gives up, and
        exits, after too many exits."""
        processes = {}
        for child, status, body in self._ask_all("/healthz"):
            if not child.running:
                processes[str(child.index)] = {"ok": True, "detail": f"exited {child.last_exit}; restarting"}
            elif status is None:
                starting = time.monotonic() - child.started_at < STARTING_GRACE_S
                processes[str(child.index)] = {"ok": starting, "detail": f"not answering: {body.decode()}"}
            else:
                processes[str(child.index)] = {"ok": status == 200, "detail": _json_or_text(body)}
        return {"ok": all(p["ok"] for p in processes.values()), "processes": processes}

    def ready(self) -> dict:
        """Ready when every worker is; `checks` holds each check failed if any worker failed it."""
        processes, checks = {}, {}
        for child, status, body in self._ask_all("/readyz"):
            if not child.running:
                report = {"error": f"exited {child.last_exit}; restarting"}
            elif status is None:
                report = {"error": body.decode()}
            else:
                answer = _json_or_text(body)
                report = answer if isinstance(answer, dict) else {"detail": answer}
            processes[str(child.index)] = {**report, "ok": child.running and status == 200, "pid": child.pid}
            for name, check in (report.get("checks") or {}).items():
                if name not in checks or (checks[name].get("ok") and not check.get("ok")):
                    checks[name] = check
        return {"ok": all(p["ok"] for p in processes.values()), "checks": checks, "processes": processes}

    def serve(self, port: int) -> metrics.MetricsServer:
        registry = CollectorRegistry()
        registry.register(WorkersCollector(self))
        return metrics.serve(port, app=metrics.make_app(registry, live=self.live, ready=self.ready))


class WorkersCollector(Collector):
    """Every worker's /metrics with a `process` label, and the supervisor's own: which workers run, and how
    often each was restarted."""

    def __init__(self, view: PodView) -> None:
        self.view = view

    def describe(self):
        return []

    def collect(self):
        merged: dict[tuple[str, str], Metric] = {}
        answered = set()
        for child, status, body in self.view._ask_all("/metrics"):
            if status != 200:
                continue
            try:
                families = list(text_string_to_metric_families(body.decode()))
            except ValueError as exc:
                log.warning("cannot read worker process %d's metrics: %s", child.index, exc)
                continue
            answered.add(child.index)
            for family in families:
                key = (family.name, family.type)
                target = merged.setdefault(key, Metric(family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "process": str(child.index)}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield from merged.values()
        yield from self._own(answered)

    def _own(self, answered: set[int]):
        up = GaugeMetricFamily(metrics.PROCESS_UP, "1 while this worker process runs and serves its metrics",
                               labels=["process"])
        restarts = CounterMetricFamily(metrics.PROCESS_RESTARTS.removesuffix("_total"),
                                       "Times the supervisor restarted this worker process", labels=["process"])
        for child in self.view.supervisor.children:
            up.add_metric([str(child.index)], 1.0 if child.running and child.index in answered else 0.0)
            restarts.add_metric([str(child.index)], child.restarts)
        yield up
        yield restarts
