"""Counters for telemetry and status, updated from the MQTT and worker threads."""

from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from pathlib import Path


class Histogram:
    """Cumulative-bucket histogram, as Prometheus reads it."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1

    def buckets(self) -> list[tuple[str, int]]:
        total, out = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tokens = 0
        self.drafted = 0  # speculative decoding's guessed tokens, and those accepted
        self.accepted = 0
        self.unanswerable = 0
        self.disconnects = 0  # HTTP clients that hung up before their answer was complete
        self.stalled = 0  # streams cancelled because their HTTP client stopped reading
        self.dead_letters = 0  # journaled requests set aside after failing MAX_ATTEMPTS times
        self.decode_tps = 0.0
        self.ttft_ms = Histogram((10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.decode_tps_hist = Histogram((5, 10, 20, 30, 50, 75, 100, 150, 200, 400))

    def request(self, method: str) -> None:
        with self._lock:
            self.requests[method] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def disconnected(self) -> None:
        with self._lock:
            self.disconnects += 1

    def stall(self) -> None:
        with self._lock:
            self.stalled += 1

    def dead_letter(self) -> None:
        with self._lock:
            self.dead_letters += 1

    def lost(self) -> None:
        with self._lock:
            self.unanswerable += 1

    def generated(self, tokens: int, decode_tps: float, ttft_ms: float | None = None, drafted: int = 0,
                  accepted: int = 0) -> None:
        with self._lock:
            self.tokens += tokens
            self.drafted += drafted
            self.accepted += accepted
            if ttft_ms is not None:
                self.ttft_ms.observe(ttft_ms)
            if decode_tps:
                self.decode_tps_hist.observe(decode_tps)
            if decode_tps:
                self.decode_tps = decode_tps if not self.decode_tps else 0.8 * self.decode_tps + 0.2 * decode_tps

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(self.requests), "requests_total": sum(self.requests.values()),
                "errors": dict(self.errors), "errors_total": sum(self.errors.values()),
                "unanswerable": self.unanswerable, "disconnects": self.disconnects,
                "stalled": self.stalled, "dead_letters": self.dead_letters, "tokens": self.tokens,
                "draft_tokens": self.drafted, "draft_accepted_tokens": self.accepted,
                "decode_tps": round(self.decode_tps, 2),
                "rss_mb": round(current_rss_mb(), 1),
                "cpu_temp_c": cpu_temperature(),
            }


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_temperature() -> float | None:
    """The hottest thermal zone in °C, where the board exposes one (Raspberry Pi, most x86 boards)."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text()) / 1000)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None
