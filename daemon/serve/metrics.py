"""GET /metrics: the daemon's Stats in Prometheus text format, from a registry of our own (no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from edgellm.daemon.serve.replies import ModelInfo
from edgellm.daemon.serve.stats import Histogram, Stats


class Metrics:
    def __init__(self, stats: Stats, queue_depth: Callable[[], int], model_info: Callable[[], ModelInfo],
                 update_state: Callable[[], str] = lambda: "none"):
        self.stats, self.queue_depth, self.model_info, self.update_state = stats, queue_depth, model_info, update_state
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @staticmethod
    def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, buckets=h.buckets(), sum_value=h.sum)

    def collect(self):
        s = self.stats
        with s._lock:
            requests = CounterMetricFamily("edgellm_requests", "Requests received, by method", labels=["method"])
            for method, n in s.requests.items():
                requests.add_metric([method], n)
            errors = CounterMetricFamily("edgellm_errors", "Error replies, by code", labels=["code"])
            for code, n in s.errors.items():
                errors.add_metric([code], n)
            yield requests
            yield errors
            yield CounterMetricFamily("edgellm_tokens", "Tokens generated", value=s.tokens)
            yield CounterMetricFamily("edgellm_draft_tokens", "Tokens guessed by speculative decoding and checked",
                                      value=s.drafted)
            yield CounterMetricFamily("edgellm_draft_accepted_tokens", "Guessed tokens the model sampled too",
                                      value=s.accepted)
            yield CounterMetricFamily("edgellm_unanswerable", "Requests without a usable reply address",
                                      value=s.unanswerable)
            yield CounterMetricFamily("edgellm_stalled_streams", "HTTP streams cancelled because the client stopped "
                                      "reading", value=s.stalled)
            yield CounterMetricFamily("edgellm_dead_letters", "Journaled requests set aside after failing twice",
                                      value=s.dead_letters)
            yield CounterMetricFamily("edgellm_client_disconnects", "HTTP requests cancelled because the client "
                                      "hung up", value=s.disconnects)
            yield self._histogram("edgellm_time_to_first_token_ms", "Time to first token (ms)", s.ttft_ms)
            yield self._histogram("edgellm_decode_tokens_per_second", "Decode speed per request", s.decode_tps_hist)
        yield GaugeMetricFamily("edgellm_queue_depth", "Requests queued or running", value=self.queue_depth())
        model = self.model_info()
        info = InfoMetricFamily("edgellm_model", "The model being served")
        info.add_metric([], {"name": model.name, "version": model.version})
        yield info
        state = InfoMetricFamily("edgellm_update", "State of the model update agent")
        state.add_metric([], {"state": self.update_state()})
        yield state
