"""Soak: many mixed requests against one daemon, to show that every request is answered with the right code and
that memory stays bounded.

Starts its own mosquitto and `edgellm serve` (SmolLM2 int4 + MiniLM + a retrieval store), then sends
--requests requests round-robin over generate, chat, embed, search and bad payloads (invalid JSON, unknown
fields, wrong types, deep nesting, lone surrogates), --window of them in flight. The daemon's RSS is sampled
from /proc; growth is measured from the end of the warm-up (the first --warmup requests, which fill the
prefix cache and onnxruntime's arenas) to the end.

    .venv/bin/python scripts/soak.py [--requests 10000] [--warmup 1000]
"""

from __future__ import annotations

import argparse
import json
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

TOPICS = ["Explain a service contract.", "What is an invoice?", "Name a colour.", "Describe a pump.",
          "What is VAT?", "Say hello in French.", "What does a warranty cover?", "Define a lease."]


def mix(i: int) -> tuple[str, bytes, set[str]]:
    """Request i: (method, payload, the reply codes that are right for it; 'ok' for success)."""
    topic = TOPICS[i % len(TOPICS)]
    kind = i % 8
    if kind in (0, 1):
        return "generate", json.dumps({"prompt": f"{topic} ({i})", "max_tokens": 8, "temperature": 0.7,
                                       "seed": i}).encode(), {"ok"}
    if kind == 2:
        return "chat", json.dumps({"messages": [{"role": "user", "content": f"{topic} #{i}"}], "max_tokens": 8,
                                   "temperature": 0}).encode(), {"ok"}
    if kind == 3:
        return "embed", json.dumps({"input": [topic, f"request {i}"]}).encode(), {"ok"}
    if kind == 4:
        return "search", json.dumps({"query": topic, "k": 3}).encode(), {"ok"}
    bad = [b"{not json", b'{"prompt": "x", "max_tokens": "10"}', b'{"prompt": "x", "temprature": 1}',
           b"[" * 50_000 + b"]" * 50_000, b'{"prompt": "x", "id": "\\ud800"}', b'{"input": []}',
           b'{"prompt": "x", "json_schema": {"$ref": "#"}}', b'{"prompt": ""}'][i % 8]
    return ("embed" if bad == b'{"input": []}' else "generate"), bad, {"bad_request"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=1_000)
    p.add_argument("--window", type=int, default=8, help="requests in flight at once")
    args = p.parse_args()
    model = cached_build(ROOT / ".cache/bench/smollm2-int4", "smollm2", "--quant", "int4")
    minilm = cached_build(ROOT / ".cache/bench/minilm", "minilm", "--task", "embedding")
    unanswered, wrong, samples = 0, [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Broker(folder).start()
        daemon = DaemonProcess(folder, broker.port, model, device="soak", env={
            "EDGELLM_EMBEDDING__PATH": str(minilm), "EDGELLM_STORE__PATH": str(folder / "store.db"),
            "EDGELLM_TELEMETRY_INTERVAL": "5", "EDGELLM_LOG_LEVEL": "WARNING",
            "EDGELLM_LIMITS__QUEUE_SIZE": str(args.window * 2)}).start()
        try:
            with RpcClient(settings(broker.port)) as c:
                base = "edgellm/v1/soak/rpc/"
                docs = " ".join(TOPICS) + " Pumps carry a 24 month warranty. Leases run for three years."
                assert c.call(base + "ingest", {"text": docs, "source": "soak.txt"})["ok"]
                slots = threading.Semaphore(args.window)
                pending: list[tuple[int, threading.Event, list[dict], set[str]]] = []
                started = time.perf_counter()
                for i in range(args.requests):
                    method, payload, expected = mix(i)
                    slots.acquire()
                    done, messages = c.send(base + method, payload)
                    threading.Thread(target=lambda d=done: (d.wait(120), slots.release()), daemon=True).start()
                    pending.append((i, done, messages, expected))
                    if i % 250 == 0:
                        samples.append((i, rss_mb(daemon.proc.pid)))
                for i, done, messages, expected in pending:
                    if not done.wait(120):
                        unanswered += 1
                        continue
                    reply = messages[0]
                    code = "ok" if reply["ok"] else reply["error"]["code"]
                    if code not in expected or len(messages) != 1:
                        wrong.append((i, code))
                elapsed = time.perf_counter() - started
                samples.append((args.requests, rss_mb(daemon.proc.pid)))
        finally:
            daemon.stop()
            broker.stop()
    after_warmup = [mb for i, mb in samples if i >= args.warmup]
    start_mb, end_mb = after_warmup[0], samples[-1][1]
    summary = {"requests": args.requests, "unanswered": unanswered, "wrong_codes": len(wrong),
               "rss_start_mb": round(start_mb, 1), "rss_end_mb": round(end_mb, 1),
               "rss_max_mb": round(max(after_warmup), 1), "rss_growth_ratio": round(end_mb / start_mb, 3),
               "warmup_requests": args.warmup, "requests_per_s": round(args.requests / elapsed, 1)}
    if wrong:
        print(f"wrong codes (first 10): {wrong[:10]}", file=sys.stderr)
    print(f"RSS samples (request, MB): {[(i, round(mb)) for i, mb in samples]}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
