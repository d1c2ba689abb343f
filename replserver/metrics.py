"""Prometheus metrics (prometheus-client) and the structured access log.

Counts that already live elsewhere (sessions, the pool, evictions) are read at scrape
time; only what happens per execution is recorded as it happens, once per execution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .execution import Execution

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 300)


class Metrics:
    """This server's metrics registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.executions = Counter(
            "replserver_executions",
            "Executions finished, by how they ended.",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "replserver_execution_duration_seconds",
            "Wall time of executions, from reaching the child to completion.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.output_bytes = Counter(
            "replserver_output_bytes",
            "Bytes of output (stdout and stderr) received from children and kept.",
            registry=self.registry,
        )
        self.child_restarts = Counter(
            "replserver_child_restarts",
            "Sessions whose child died or was killed and was replaced by a fresh one.",
            registry=self.registry,
        )
        self._by_reason: dict[str, Counter] = {}

    def execution_finished(self, execution: Execution) -> None:
        # The labelled child per reason, kept: labels() checks and looks it up under a lock
        # each time, half of this method's cost (py-spy, the warm workload).
        reason = execution.reason
        counter = self._by_reason.get(reason)
        if counter is None:
            counter = self._by_reason[reason] = self.executions.labels(reason)
        counter.inc()
        self.duration.observe(execution.duration_ms / 1000)
        self.output_bytes.inc(execution.output_bytes)

    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """Expose gauges and counters computed at scrape time by `read`."""
        self.registry.register(_Snapshot(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """Values owned by the manager and the pool, read when Prometheus scrapes."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        values = self._read()
        yield GaugeMetricFamily(
            "replserver_sessions_live", "Sessions alive now.", value=values["live"]
        )
        ended = CounterMetricFamily(
            "replserver_sessions_ended", "Sessions ended by the server.", labels=["why"]
        )
        for why in ("culled", "evicted", "deleted"):
            ended.add_metric([why], values[why])
        yield ended
        yield GaugeMetricFamily(
            "replserver_pool_warm", "Warm children ready to be handed out.", value=values["warm"]
        )
        yield CounterMetricFamily(
            "replserver_children_started", "Children started.", value=values["spawned"]
        )


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration and, for executions, the session,
    execution id and reason. Never the code or its output. JSON with REPL_LOG_FORMAT=json."""

    json_format = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "durationMs": round(time * 1000, 3),
            "remote": request.remote,
        }
        extra = request.get(ACCESS_FIELDS)
        if extra:
            fields.update(extra)
        if self.json_format:
            self.logger.info(json.dumps(fields))
        else:
            self.logger.info(" ".join(f"{k}={v}" for k, v in fields.items()))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class JsonAccessLogger(AccessLogger):
    json_format = True


# Request storage: the extra fields (session, execution, reason) of the access log line.
ACCESS_FIELDS = web.RequestKey("replserver.access", dict[str, Any])
