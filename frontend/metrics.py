"""Prometheus metrics of one API server, in a registry of its own (several apps may share a process).

Per-request figures are recorded when an engine request ends. The engine's own figures (running
and waiting requests, KV-cache usage, preemptions, prefix-cache queries and hits) are read from
`AsyncLLM.get_stats()` when /metrics is scraped and exported as they are: they are the same
whichever API server is asked. So are those of speculative decoding: drafts verified and kept,
the acceptance rate (kept / verified) and the mean acceptance length (tokens one verifying step
emits for a request: 1 + kept / verifying steps, vLLM's definition).

Under `conveyor serve --api-server-count K` the supervisor sets PROMETHEUS_MULTIPROC_DIR for its
API servers: prometheus_client then keeps each process's request metrics in files there, and a
scrape of any server sums all of them (prometheus_client's multiprocess mode).
"""

import asyncio
import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from conveyor.frontend.outputs import RequestOutput

logger = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                         0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.requests = counter("conveyor_request_success", "Finished requests by finish reason.",
                                ["finished_reason"])
        self.prompt_tokens = counter("conveyor_prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self.generation_tokens = counter("conveyor_generation_tokens", "Tokens generated.").labels(model_name)
        self.ttft = histogram("conveyor_time_to_first_token_seconds", "Arrival to first token.",
                              LATENCY_BUCKETS)
        self.tpot = histogram("conveyor_time_per_output_token_seconds",
                              "Mean time between output tokens, per request.", TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("conveyor_e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = histogram("conveyor_request_queue_time_seconds", "Arrival to first scheduled.",
                               LATENCY_BUCKETS)
        self.engine_stats: dict = {}
        self.registry.register(EngineStatsCollector(self))

    def observe_finished(self, output: RequestOutput) -> None:
        """One engine request ended normally; `output` is its last (finished) output."""
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        m = output.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def observe_completion(self, finish_reason: str, num_tokens: int, output: RequestOutput | None) -> None:
        """One sequence (a choice) ended: count it and its tokens."""
        self.requests.labels(self.model_name, finish_reason).inc()
        self.generation_tokens.inc(num_tokens)
        m = output.metrics if output is not None else None
        if m is not None and num_tokens > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.tpot.observe((m.last_token_time - m.first_token_time) / (num_tokens - 1))

    async def refresh(self, engine) -> None:
        if engine is None or engine.is_dead:
            return
        try:
            self.engine_stats = await asyncio.wait_for(engine.get_stats(), STATS_TIMEOUT_S)
        except Exception as e:  # a slow or dying engine must not fail the scrape
            logger.warning("engine stats unavailable: %s", e)

    def render(self) -> bytes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every API server's request metrics, summed
        MultiProcessCollector(registry, directory)
        registry.register(EngineStatsCollector(self))
        return generate_latest(registry)


class EngineStatsCollector:
    """The engine's figures, from the stats of the last scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        stats, name = self.metrics.engine_stats, self.metrics.model_name

        def family(kind, metric, doc, value):
            f = kind(metric, doc, labels=["model_name"])
            f.add_metric([name], value)
            return f

        yield family(GaugeMetricFamily, "conveyor_num_requests_running", "Requests in the running batch.",
                     stats.get("num_running", 0))
        yield family(GaugeMetricFamily, "conveyor_num_requests_waiting", "Requests waiting to be scheduled.",
                     stats.get("num_waiting", 0))
        yield family(GaugeMetricFamily, "conveyor_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                     stats.get("kv_cache_usage", 0.0))
        yield family(GaugeMetricFamily, "conveyor_num_preemptions", "Preemptions since the engine started.",
                     stats.get("num_preemptions", 0))
        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        yield family(CounterMetricFamily, "conveyor_prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache.", queries)
        yield family(CounterMetricFamily, "conveyor_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     hits)
        yield family(GaugeMetricFamily, "conveyor_prefix_cache_hit_rate",
                     "Prefix-cache hits / queries since the engine started (0-1).", hits / queries if queries else 0.0)
        yield family(GaugeMetricFamily, "conveyor_num_loras_running",
                     "Distinct LoRA adapters of the running requests.", stats.get("num_running_loras", 0))
        yield family(GaugeMetricFamily, "conveyor_num_loras_waiting",
                     "Distinct LoRA adapters of the waiting requests.", stats.get("num_waiting_loras", 0))
        yield family(CounterMetricFamily, "conveyor_lora_loads", "LoRA adapters the workers loaded, reloads after "
                     "eviction included.", stats.get("num_lora_loads", 0))
        drafts, drafted = stats.get("num_drafts", 0), stats.get("num_draft_tokens", 0)
        accepted = stats.get("num_accepted_tokens", 0)
        yield family(CounterMetricFamily, "conveyor_spec_decode_num_drafts",
                     "Speculative decoding: steps of a request that verified draft tokens.", drafts)
        yield family(CounterMetricFamily, "conveyor_spec_decode_num_draft_tokens", "Draft tokens verified.", drafted)
        yield family(CounterMetricFamily, "conveyor_spec_decode_num_accepted_tokens", "Draft tokens the model kept.",
                     accepted)
        yield family(GaugeMetricFamily, "conveyor_spec_decode_acceptance_rate",
                     "Draft tokens kept / verified since the engine started (0-1).",
                     accepted / drafted if drafted else 0.0)
        yield family(GaugeMetricFamily, "conveyor_spec_decode_mean_acceptance_length",
                     "Tokens a verifying step emits for a request: 1 + kept drafts / verifying steps.",
                     1.0 + accepted / drafts if drafts else 0.0)
