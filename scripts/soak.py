"""Soak: many mixed requests against one daemon, to show that every request is answered with the right code and
that memory stays bounded.

Starts its own mosquitto and `edgellm serve` (SmolLM2 int4 + MiniLM + a retrieval store), then sends
--requests requests round-robin over generate, chat, embed, search and bad payloads (invalid JSON, unknown
fields, wrong types, deep nesting, lone surrogates), --window of them in flight. With --hostile, one request
in eight is hostile instead: a long prompt (about 3,000 tokens, each one different), a large schema, a tool
whose parameters loop, a huge or NUL-holding ingest path, or an MQTT 3.1.1 request whose reply_to Mosquitto
would refuse (not answered by design: counted as `unanswerable_sent`, and the device must keep answering).
The daemon's RSS is sampled from /proc; growth is measured from the end of the warm-up (the first --warmup
requests, which fill the prefix cache and onnxruntime's arenas) to the end.

    .venv/bin/python scripts/soak.py [--requests 10000] [--warmup 1000]
    .venv/bin/python scripts/soak.py --hostile --requests 2000 --warmup 400
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

import paho.mqtt.client as mqtt  # noqa: E402
from bench_models import cached_build  # noqa: E402  (scripts/, on the path when a script runs)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

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


CLAUSE = "Clause {n}.{j}: the supplier delivers the goods on the agreed day, or pays a penalty."


def big_schema(i: int) -> dict:
    """200 closed properties with enums: a large grammar to compile, different for every request."""
    props = {f"field_{i}_{k}": {"enum": [f"v{k}", f"w{k}", str(i)]} for k in range(200)}
    return {"type": "object", "properties": props, "required": [], "additionalProperties": False}


def hostile(i: int, allowed: Path) -> tuple[str, bytes, set[str]]:
    """Request i of the hostile mix; method "legacy:..." is sent by an MQTT 3.1.1 client and expects no reply."""
    kind = (i // 8) % 6
    if kind == 0:
        prompt = " ".join(CLAUSE.format(n=i, j=j) for j in range(150))
        return "generate", json.dumps({"prompt": prompt, "max_tokens": 4, "raw": True}).encode(), {"ok"}
    if kind == 1:
        return "generate", json.dumps({"prompt": f"Fill the form {i}.", "max_tokens": 8,
                                       "json_schema": big_schema(i)}).encode(), {"ok", "bad_request"}
    if kind == 2:
        tool = {"type": "function", "function": {"name": "loop", "parameters": {"$ref": "#"}}}
        return "chat", json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}).encode(), \
            {"bad_request"}
    if kind == 3:
        return "ingest", json.dumps({"path": str(allowed / "huge.txt")}).encode(), {"too_large"}
    if kind == 4:
        return "ingest", json.dumps({"path": str(allowed) + f"/x\u0000{i}.txt"}).encode(), {"bad_request"}
    bad = ["x/a\u0001b", "x/+", "#", "$SYS/x", "x/\u0000"][i % 5]
    return "legacy:status", json.dumps({"reply_to": bad, "id": f"h{i}"}).encode(), set()


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
    p.add_argument("--hostile", action="store_true", help="one request in eight hostile (see above)")
    args = p.parse_args()
    model = cached_build(ROOT / ".cache/bench/smollm2-int4", "smollm2", "--quant", "int4")
    minilm = cached_build(ROOT / ".cache/bench/minilm", "minilm", "--task", "embedding")
    unanswered, duplicates, unanswerable_sent, wrong, samples = 0, 0, 0, [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        allowed = folder / "allowed"
        allowed.mkdir()
        with open(allowed / "huge.txt", "wb") as f:
            f.truncate(300 << 20)  # sparse
        broker = Broker(folder).start()
        daemon = DaemonProcess(folder, broker.port, model, device="soak", env={
            "EDGELLM_EMBEDDING__PATH": str(minilm), "EDGELLM_STORE__PATH": str(folder / "store.db"),
            "EDGELLM_TELEMETRY_INTERVAL": "5", "EDGELLM_LOG_LEVEL": "WARNING",
            "EDGELLM_STORE__INGEST_DIRS": json.dumps([str(allowed)]),
            "EDGELLM_LIMITS__QUEUE_SIZE": str(args.window * 2)}).start()
        legacy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-legacy", protocol=mqtt.MQTTv311)
        legacy.connect("127.0.0.1", broker.port)
        legacy.loop_start()
        try:
            with RpcClient(settings(broker.port)) as c:
                base = "edgellm/v1/soak/rpc/"
                docs = " ".join(TOPICS) + " Pumps carry a 24 month warranty. Leases run for three years."
                assert c.call(base + "ingest", {"text": docs, "source": "soak.txt"})["ok"]
                slots = threading.Semaphore(args.window)
                pending: list[tuple[int, threading.Event, list[dict], set[str]]] = []
                started = time.perf_counter()
                for i in range(args.requests):
                    method, payload, expected = hostile(i, allowed) if args.hostile and i % 8 == 7 else mix(i)
                    if method.startswith("legacy:"):
                        legacy.publish(base + method.split(":")[1], payload, qos=1).wait_for_publish(10)
                        unanswerable_sent += 1
                        continue
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
                    if code not in expected:
                        wrong.append((i, code))
                elapsed = time.perf_counter() - started
                samples.append((args.requests, rss_mb(daemon.proc.pid)))
                status = c.call(base + "status", {}, timeout=30)  # replies are ordered: any repeat came before
                duplicates = sum(len(messages) - 1 for _, _, messages, _ in pending if len(messages) > 1)
        finally:
            legacy.disconnect()
            legacy.loop_stop()
            daemon.stop()
            broker.stop()
    after_warmup = [mb for i, mb in samples if i >= args.warmup]
    start_mb, end_mb = after_warmup[0], samples[-1][1]
    summary = {"requests": args.requests, "hostile": args.hostile, "unanswered": unanswered,
               "duplicates": duplicates, "wrong_codes": len(wrong), "unanswerable_sent": unanswerable_sent,
               "unanswerable_counted": status["unanswerable"], "internal_errors": status["errors"].get("internal", 0),
               "rss_start_mb": round(start_mb, 1), "rss_end_mb": round(end_mb, 1),
               "rss_max_mb": round(max(after_warmup), 1), "rss_growth_ratio": round(end_mb / start_mb, 3),
               "warmup_requests": args.warmup, "requests_per_s": round(args.requests / elapsed, 1)}
    if wrong:
        print(f"wrong codes (first 10): {wrong[:10]}", file=sys.stderr)
    print(f"RSS samples (request, MB): {[(i, round(mb)) for i, mb in samples]}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
