"""Prometheus metrics of the manager, served over HTTP on loopback (``metrics`` in the YAML).

Counters and histograms are updated by the socket loop as things happen; gauges (queues, memory, saved
conversations) are refreshed from the loop's state once a second, so the HTTP thread never reads live state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from model_client.security import is_local
from model_manager.config import Metrics as MetricsSettings

if TYPE_CHECKING:
    from model_manager.policy import DeviceView
    from model_manager.slots import ModelSlot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
log = structlog.get_logger("model_manager.metrics")


class ManagerMetrics:
    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mm_requests",
            "Requests answered, by op, model and outcome (ok or an error code)",
            ["op", "model", "code"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "mm_queue_wait_seconds",
            "Time a request waited for its model (load included)",
            ["op", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.class_wait = Histogram(
            "mm_class_wait_seconds",
            "Time a request waited for its model, by latency class (voice, chat, batch: from its priority)",
            ["model", "latency_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mm_time_to_first_token_seconds",
            "Generation: evaluation start to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "mm_request_seconds", "Request received to reply sent", ["op", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.cancelled = Counter("mm_requests_cancelled", "Requests stopped early", ["model", "reason"], registry=r)
        self.rate_limited = Counter("mm_rate_limited", "Requests refused by the per-client rate limit", registry=r)
        self.loads = Counter("mm_model_loads", "Model loads, by outcome", ["model", "outcome"], registry=r)
        self.unloads = Counter(
            "mm_model_unloads",
            "Model unloads by reason (pressure = evicted for another model)",
            ["model", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge("mm_queue_depth", "Requests waiting per model", ["model"], registry=r)
        self.in_flight = Gauge("mm_in_flight", "Requests running per model", ["model"], registry=r)
        self.loaded = Gauge("mm_model_loaded", "1 when the model is loaded", ["model"], registry=r)
        self.model_bytes = Gauge(
            "mm_model_memory_bytes", "Memory a model holds, per device", ["model", "device"], registry=r
        )
        self.device_bytes = Gauge(
            "mm_device_memory_bytes",
            "Device memory: total, used_by_others, reserved, free",
            ["device", "kind"],
            registry=r,
        )
        self.conversations = Gauge(
            "mm_cached_conversations", "Saved conversation states per model", ["model"], registry=r
        )
        self.conversation_bytes = Gauge(
            "mm_cached_conversation_bytes", "RAM held by saved conversation states", ["model"], registry=r
        )
        self.parallel = Gauge("mm_parallel", "Requests a model serves at once (its sequences)", ["model"], registry=r)
        self.sequences_busy = Gauge(
            "mm_sequences_busy", "A batching model's sequences decoding now", ["model"], registry=r
        )
        self.live_conversations = Gauge(
            "mm_live_conversations", "Conversations held on a batching model's sequences", ["model"], registry=r
        )
        self.tokens_per_second = Gauge(
            "mm_generated_tokens_per_second",
            "A batching model's tokens generated, over its last second",
            ["model"],
            registry=r,
        )
        self.mean_batch = Gauge(
            "mm_mean_batch", "Sequences a batching model decoded per step, over its last second", ["model"], registry=r
        )
        self.threads = Gauge("mm_threads", "CPU threads a model's worker was last given", ["model"], registry=r)
        self.url: str | None = None
        self._server = None

    def start(self) -> None:
        s = self.settings
        if not s.enabled:
            return
        if not s.allow_remote and not is_local(f"tcp://{s.host}:{s.port}"):
            raise ValueError(f"metrics.host {s.host} is not loopback: set metrics.allow_remote to serve it anyway")
        self._server, _thread = start_http_server(s.port, addr=s.host, registry=self.registry)
        port = self._server.server_port
        self.url = f"http://{s.host}:{port}/metrics"
        log.info("metrics_serving", url=self.url)

    def refresh(self, slots: list[ModelSlot], views: list[DeviceView]) -> None:
        for slot in slots:
            self.queue_depth.labels(slot.name).set(len(slot.queue))
            self.in_flight.labels(slot.name).set(len(slot.running))
            self.loaded.labels(slot.name).set(1 if slot.state.value == "ready" else 0)
            for device in {d.device.id for d in views}:
                self.model_bytes.labels(slot.name, device).set(slot.placements.get(device, 0))
            self.conversations.labels(slot.name).set(slot.kv_stats.get("conversations", 0))
            self.conversation_bytes.labels(slot.name).set(slot.kv_stats.get("bytes", 0))
            self.parallel.labels(slot.name).set(slot.capacity - slot.voice_sequences)
            loaded = slot.state.value == "ready"
            batching = slot.batching if loaded else {}
            self.sequences_busy.labels(slot.name).set(batching.get("sequences_busy", 0))
            self.tokens_per_second.labels(slot.name).set(batching.get("tokens_per_s", 0))
            self.mean_batch.labels(slot.name).set(batching.get("mean_batch", 0))
            self.live_conversations.labels(slot.name).set(slot.kv_stats.get("live", 0) if loaded else 0)
            self.threads.labels(slot.name).set((slot.threads or 0) if slot.worker is not None else 0)
        for view in views:
            device = view.device
            self.device_bytes.labels(device.id, "total").set(device.total)
            self.device_bytes.labels(device.id, "used_by_others").set(device.used_by_others)
            self.device_bytes.labels(device.id, "reserved").set(view.reserved)
            self.device_bytes.labels(device.id, "free").set(max(0, view.free))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
