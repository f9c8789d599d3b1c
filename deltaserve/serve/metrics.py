"""Prometheus metrics for /metrics, in a registry of their own per app (tests start several apps in one process).

Gauges (running / waiting sequences, KV blocks and GDN state slots used and total) are read at scrape time from the
snapshot the engine thread publishes; counters and histograms are updated on the event loop as outputs arrive.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_GAUGES = (  # (name, help, EngineStats field)
    ("deltaserve_num_requests_running", "Sequences running (holding a GDN state slot).", "running"),
    ("deltaserve_num_requests_waiting", "Sequences waiting to be scheduled.", "waiting"),
    ("deltaserve_kv_blocks_used", "Paged-KV blocks in use by requests.", "kv_blocks_used"),
    ("deltaserve_kv_blocks_total", "Paged-KV blocks in the pool.", "kv_blocks_total"),
    ("deltaserve_prefix_cache_kv_blocks", "Paged-KV blocks held only by cached prompt prefixes (released when "
     "requests need them).", "prefix_cache_kv_blocks"),
    ("deltaserve_state_slots_used", "GDN state slots in use.", "state_slots_used"),
    ("deltaserve_state_slots_total", "GDN state slots in the pool.", "state_slots_total"),
)


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.stats
        for name, doc, field in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], getattr(stats, field))
            yield g
        if stats.kv_blocks_total:
            g = GaugeMetricFamily("deltaserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                                  labels=["model_name"])
            g.add_metric([self.model_name], stats.kv_blocks_used / stats.kv_blocks_total)
            yield g


class ServerMetrics:
    """Observer passed to AsyncEngine; `render()` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens of accepted requests.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("deltaserve_generation_tokens", "Generated tokens.", labels,
                                         registry=r).labels(model_name)
        self.cached_tokens = Counter("deltaserve_prefix_cache_hit_tokens", "Prompt tokens of finished requests that "
                                     "the prefix cache supplied (against deltaserve_prompt_tokens: the hit rate).",
                                     labels, registry=r).labels(model_name)
        self.finished = Counter("deltaserve_request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("deltaserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("deltaserve_time_per_output_token_seconds", "Mean time per generated token after "
                              "the first.", labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("deltaserve_e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

    def attach(self, engine) -> None:
        """Export the engine's gauges (running/waiting, KV blocks, state slots)."""
        self.registry.register(_EngineCollector(engine, self.model_name))

    def on_added(self, stream) -> None:
        self.prompt_tokens.inc(stream.num_prompt_tokens)

    def on_output(self, stream, output, new_tokens: int) -> None:
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            if stream.num_generated == new_tokens:  # this output carries the first tokens
                self.ttft.observe(stream.first_token - stream.arrival)

    def on_finished(self, stream, output) -> None:
        now = time.monotonic()
        self.e2e.observe(now - stream.arrival)
        if stream.first_token is not None and stream.num_generated > 1:
            self.tpot.observe((now - stream.first_token) / (stream.num_generated - 1))
        self.cached_tokens.inc(output.num_cached_tokens)
        reasons = {c.finish_reason or "abort" for c in output.outputs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        self.finished.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
