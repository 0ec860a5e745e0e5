"""Prometheus metrics: request counters and latency histograms updated by the handlers, engine
gauges (running/waiting requests, KV cache usage, prefix cache hit rate) read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, backends: dict):
        self.registry = CollectorRegistry()
        self.requests = Counter("lmserve_requests", "Chat completion requests by final HTTP status.",
                                ["model", "status"], registry=self.registry)
        self.rate_limited = Counter("lmserve_rate_limited", "Requests refused by a rate limit (429), by limit.",
                                    ["model", "limit"], registry=self.registry)
        self.prompt_tokens = Counter("lmserve_prompt_tokens", "Prompt tokens processed.", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("lmserve_generation_tokens", "Tokens generated.", ["model"],
                                         registry=self.registry)
        self.ttft = Histogram("lmserve_time_to_first_token_seconds", "Time from request arrival to the first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lmserve_inter_token_latency_seconds",
                             "Time between two streamed engine steps of a request.",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lmserve_request_latency_seconds", "Time from request arrival to its last token.",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(backends))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, backends: dict):
        self.backends = backends

    def collect(self):
        running = GaugeMetricFamily("lmserve_num_requests_running", "Sequences in the running batch.", labels=["model"])
        waiting = GaugeMetricFamily("lmserve_num_requests_waiting", "Sequences waiting for admission.",
                                    labels=["model"])
        kv = GaugeMetricFamily("lmserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.", labels=["model"])
        hit = GaugeMetricFamily("lmserve_prefix_cache_hit_rate",
                                "Prompt tokens served from the prefix cache / prompt tokens looked up.",
                                labels=["model"])
        # Speculative decoding (engine/spec_decode/), for the models that run it.
        drafted = CounterMetricFamily("lmserve_spec_decode_num_draft_tokens", "Proposed tokens sent to verification.",
                                      labels=["model"])
        accepted = CounterMetricFamily("lmserve_spec_decode_num_accepted_tokens",
                                       "Proposed tokens the target accepted.", labels=["model"])
        emitted = CounterMetricFamily("lmserve_spec_decode_num_emitted_tokens",
                                      "Tokens emitted by verified runs (accepted + the target's own).",
                                      labels=["model"])
        rate = HistogramMetricFamily("lmserve_spec_decode_acceptance_rate",
                                     "Accepted / proposed tokens of each verified run.", labels=["model"])
        for model_id, backend in self.backends.items():
            s = backend.stats()
            if not s:  # an upstream backend has no engine gauges
                continue
            spec = s.get("spec_decode")
            if spec is not None:
                drafted.add_metric([model_id], spec["proposed"])
                accepted.add_metric([model_id], spec["accepted"])
                emitted.add_metric([model_id], spec["emitted"])
                buckets, total = [], 0
                for bound, count in spec["acceptance_buckets"]:
                    total += count
                    buckets.append((str(bound), total))
                buckets.append(("+Inf", total))
                rate.add_metric([model_id], buckets, spec["acceptance_sum"])
            running.add_metric([model_id], s["running"])
            waiting.add_metric([model_id], s["waiting"])
            kv.add_metric([model_id], s["kv_cache_usage"])
            queries = s["prefix_cache_queries"]
            hit.add_metric([model_id], s["prefix_cache_hits"] / queries if queries else 0.0)
        yield from (running, waiting, kv, hit, drafted, accepted, emitted, rate)
