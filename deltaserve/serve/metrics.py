"""Prometheus metrics for /metrics, in a registry of their own per app (tests start several apps in one process).

Gauges (running / waiting sequences, KV blocks and GDN state slots used and total) are read at scrape time from the
snapshot the engine thread publishes; counters and histograms are updated on the event loop as outputs arrive.

Each quantity vLLM also exports is exported a second time under vLLM v1's name, type and labels (`vllm:...`,
`model_name` and `engine="0"`, vLLM's buckets), because gateways and autoscalers written for vLLM (llm-d,
production-stack, KServe, KEDA) select on those names. Same values; nothing vLLM has that we do not measure.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# vLLM v1's buckets (vllm/v1/metrics/loggers.py), so a dashboard's `le` selectors find the same edges
_VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                      20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                      40.0, 80.0)
_VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                     480.0, 960.0, 1920.0, 7680.0)
_VLLM_LABELS = ["model_name", "engine"]
_ENGINE = "0"  # one engine per server: vLLM's label value for its first engine core
_VLLM_GAUGES = (  # (name, help, EngineStats field)
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
)
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
            yield self._gauge(name, doc, getattr(stats, field))
        for name, doc, field in _VLLM_GAUGES:
            yield self._gauge(name, doc, getattr(stats, field), vllm=True)
        if stats.kv_blocks_total:
            usage = stats.kv_blocks_used / stats.kv_blocks_total
            yield self._gauge("deltaserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", usage)
            yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage,
                              vllm=True)
            # vLLM's name before 0.9; autoscaler examples written then still read it
            yield self._gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage. "
                              "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage, vllm=True)

    def _gauge(self, name: str, doc: str, value: float, vllm: bool = False) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=_VLLM_LABELS if vllm else ["model_name"])
        g.add_metric([self.model_name, _ENGINE] if vllm else [self.model_name], value)
        return g


class ServerMetrics:
    """Observer passed to AsyncEngine; `render()` is the /metrics body."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        # running totals for the periodic stats log (StatsLog): prompt tokens accepted, tokens generated, and of
        # finished requests their prompt tokens and those the prefix cache supplied
        self.totals = {"prompt": 0, "generation": 0, "finished_prompt": 0, "cached": 0}
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
        self._vllm_series(model_name)

    def _vllm_series(self, model_name: str) -> None:
        """The same counters and histograms under vLLM v1's names, types and labels."""
        r, labels, values = self.registry, _VLLM_LABELS, (model_name, _ENGINE)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                          registry=r).labels(*values)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                              labels, registry=r).labels(*values)
        self.vllm_finished = Counter("vllm:request_success", "Count of successfully processed requests.",
                                     labels + ["finished_reason"], registry=r)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                   "seconds.", labels, buckets=_VLLM_TTFT_BUCKETS, registry=r).labels(*values)
        self.vllm_tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in "
                                   "seconds.", labels, buckets=_VLLM_TPOT_BUCKETS, registry=r).labels(*values)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                  "seconds.", labels, buckets=_VLLM_E2E_BUCKETS, registry=r).labels(*values)

    def attach(self, engine) -> None:
        """Export the engine's gauges (running/waiting, KV blocks, state slots)."""
        self.registry.register(_EngineCollector(engine, self.model_name))

    def on_added(self, stream) -> None:
        self.totals["prompt"] += stream.num_prompt_tokens
        self.prompt_tokens.inc(stream.num_prompt_tokens)
        self.vllm_prompt_tokens.inc(stream.num_prompt_tokens)

    def on_output(self, stream, output, new_tokens: int) -> None:
        if new_tokens:
            self.totals["generation"] += new_tokens
            self.generation_tokens.inc(new_tokens)
            self.vllm_generation_tokens.inc(new_tokens)
            if stream.num_generated == new_tokens:  # this output carries the first tokens
                self.ttft.observe(stream.first_token - stream.arrival)
                self.vllm_ttft.observe(stream.first_token - stream.arrival)

    def on_finished(self, stream, output) -> None:
        now = time.monotonic()
        self.e2e.observe(now - stream.arrival)
        self.vllm_e2e.observe(now - stream.arrival)
        if stream.first_token is not None and stream.num_generated > 1:
            self.tpot.observe((now - stream.first_token) / (stream.num_generated - 1))
            self.vllm_tpot.observe((now - stream.first_token) / (stream.num_generated - 1))
        self.cached_tokens.inc(output.num_cached_tokens)
        self.totals["finished_prompt"] += stream.num_prompt_tokens
        self.totals["cached"] += output.num_cached_tokens
        reasons = {c.finish_reason or "abort" for c in output.outputs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        self.finished.labels(self.model_name, reason).inc()
        self.vllm_finished.labels(self.model_name, _ENGINE, reason).inc()  # vLLM's reasons: stop, length, abort

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatsLog:
    """The periodic stats line vLLM's server logs (every `interval` seconds while requests run, and once more when
    they have stopped; none while idle), from ServerMetrics' totals and the engine's snapshot:
        Avg prompt throughput: 512.0 tokens/s, Avg generation throughput: 96.3 tokens/s, Running: 3 reqs,
        Waiting: 0 reqs, KV cache usage: 4.2%, Prefix cache hit rate: 0.0%
    Throughputs are over the interval; the hit rate is over every finished request so far."""

    def __init__(self, metrics: ServerMetrics, engine, interval: float, log):
        self.metrics, self.engine, self.interval, self.log = metrics, engine, interval, log
        self.last = (time.monotonic(), dict(metrics.totals))
        self.was_active = False

    def tick(self) -> None:
        now, totals, stats = time.monotonic(), self.metrics.totals, self.engine.stats
        then, before = self.last
        moved = totals["prompt"] != before["prompt"] or totals["generation"] != before["generation"]
        active = moved or stats.running > 0 or stats.waiting > 0
        if active or self.was_active:
            dt = max(now - then, 1e-9)
            usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
            hits = totals["cached"] / totals["finished_prompt"] if totals["finished_prompt"] else 0.0
            self.log("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d "
                     "reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                     (totals["prompt"] - before["prompt"]) / dt, (totals["generation"] - before["generation"]) / dt,
                     stats.running, stats.waiting, 100 * usage, 100 * hits)
        self.was_active = active
        self.last = (now, dict(totals))
