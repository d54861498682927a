"""MQTT benchmark: the daemon's round-trip overhead over the engine, and requests/s with 1 and 8 clients.

Starts its own mosquitto (set_tcp_nodelay true) on a free loopback port and `edgellm serve` on SmolLM2 int4.
Overhead per request = client round trip - the engine's own total_ms for that same generation, as the
daemon reports it: both measured on the same request, so machine noise largely cancels.

    .venv/bin/python scripts/bench_mqtt.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_models import cached_build  # noqa: E402  (scripts/, on the path when a script runs)

from edgellm.daemon.serve.client import RpcClient  # noqa: E402
from tests.harness import Broker, DaemonProcess, settings  # noqa: E402

SHORT = {"prompt": "Say hello.", "max_tokens": 8, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def engine_only(model: Path, n: int) -> list[float]:
    """The same generation on the raw engine, in this process, for reference."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams

    g = Generator(LoadedModel.load(model, threads=2))
    ids = g.prompt_ids(SHORT["prompt"])
    params = GenerationParams(max_tokens=SHORT["max_tokens"], temperature=0)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        g.generate(ids, params)
        times.append((time.perf_counter() - t) * 1000)
    return times


def run_clients(port: int, topic: str, clients: int, per_client: int) -> float:
    barrier = threading.Barrier(clients + 1)
    errors: list[str] = []

    def work() -> None:
        with RpcClient(settings(port)) as c:
            barrier.wait()
            for _ in range(per_client):
                r = c.call(topic, SHORT, timeout=60)
                if not r["ok"]:
                    errors.append(r["error"]["code"])

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {set(errors)}")
    return clients * per_client / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--model", type=Path, default=ROOT / ".cache/bench/smollm2-int4")
    args = p.parse_args()
    cached_build(args.model, "smollm2", "--quant", "int4")
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp)).start()
        daemon = DaemonProcess(Path(tmp), broker.port, args.model, device="bench",
                               env={"EDGELLM_TELEMETRY_INTERVAL": "30", "EDGELLM_LOG_LEVEL": "WARNING"}).start()
        topic = "edgellm/v1/bench/rpc/generate"
        try:
            overhead, rtt = [], []
            with RpcClient(settings(broker.port)) as c:
                for _ in range(20):  # warm up
                    c.call(topic, SHORT)
                for _ in range(args.requests):
                    t = time.perf_counter()
                    r = c.call(topic, SHORT)
                    ms = (time.perf_counter() - t) * 1000
                    rtt.append(ms)
                    overhead.append(ms - r["timings"]["total_ms"])
            rps1 = run_clients(broker.port, topic, 1, 100)
            rps8 = run_clients(broker.port, topic, 8, 25)
        finally:
            daemon.stop()
            broker.stop()
    engine = engine_only(args.model, 100)
    summary = {
        "overhead_ms_p50": round(statistics.median(overhead), 3),
        "overhead_ms_p99": round(percentile(overhead, 0.99), 3),
        "round_trip_ms_p50": round(statistics.median(rtt), 2),
        "engine_ms_p50": round(statistics.median(engine), 2),
        "rps_1_client": round(rps1, 1), "rps_8_clients": round(rps8, 1),
        "requests": args.requests, "max_tokens": SHORT["max_tokens"],
    }
    print(f"round trip {summary['round_trip_ms_p50']} ms median for an {SHORT['max_tokens']}-token generation; "
          f"the same generation on the raw engine {summary['engine_ms_p50']} ms; daemon overhead "
          f"{summary['overhead_ms_p50']} ms median, {summary['overhead_ms_p99']} ms p99", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
