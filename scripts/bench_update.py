"""Fleet update benchmark: SmolLM2-135M int4, then the same model with a merged q_proj/v_proj LoRA (r=8), and
the same LoRA as an adapter beside the base (`model build --keep-base`).

Real parts throughout: `edgellm lora train/merge`, `model build`, `bundle build` (signed), `bundle serve`
(HTTP), mosquitto, and one `edgellm serve` device that starts on the base model as a factory install.

1. publish bundle 1 (the base): the device downloads it in full (its factory model was no bundle);
2. publish bundle 2 (the LoRA update) while a client keeps sending generate requests; measure the bytes
   fetched against the full bundle, the time from publish to SUCCEEDED, and the requests that failed;
3. a second device takes bundle 1, then bundle 3 (the same LoRA built --keep-base, so the base's blocks are
   the bundle-1 bytes and only the adapter and the graph are new): `adapter_delta_ratio`.

    .venv/bin/python scripts/bench_update.py        # models are cached in .cache/bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_models import cached_build, stale  # noqa: E402  (scripts/, on the path when a script runs)

from edgellm.daemon.serve.client import RpcClient  # noqa: E402
from edgellm.daemon.update.bundle import DesiredState  # noqa: E402
from tests.harness import Broker, DaemonProcess, UpdateWatch, free_port, retained, settings, wait_for_port  # noqa: E402

EDGELLM = [sys.executable, "-m", "edgellm.daemon.cli"]


def run(*args: str) -> None:
    subprocess.run([*EDGELLM, *args], cwd=ROOT, check=True)


def models(cache: Path, train_n: int) -> tuple[Path, Path, Path]:
    """The base int4 build, the LoRA-merged int4 build and the same merge built --keep-base (the base's
    blocks exact, the adapter beside them), made once."""
    base, tuned = cached_build(cache / "smollm2-int4", "smollm2", "--quant", "int4"), cache / "smollm2-lora-qv-int4"
    if stale(tuned):
        data, adapter, merged = cache / "invoices-train.jsonl", cache / "lora-qv", cache / "smollm2-lora-qv"
        run("data", "invoices", "--n", str(train_n), "--seed", "7", "--out", str(data))
        if not (adapter / "adapter_config.json").exists():
            run("lora", "train", "--base", "smollm2", "--data", str(data), "--out", str(adapter), "--rank", "8",
                "--target-modules", "q_proj,v_proj")
        run("lora", "merge", "--base", "smollm2", "--adapter", str(adapter), "--out", str(merged), "--force")
        run("model", "build", str(merged), "--out", str(tuned), "--quant", "int4", "--force")
    adapter_build = cache / "smollm2-lora-qv-keep-base"
    if stale(adapter_build):
        run("model", "build", str(cache / "smollm2-lora-qv"), "--out", str(adapter_build), "--quant", "int4",
            "--keep-base", "--force")
    return base, tuned, adapter_build


def publish(store: Path, url: str, port: int, version: str, group: str = "bench") -> str:
    run("bundle", "publish", "--store", str(store), "--url", url, "--group", group, "--name", "smollm2",
        "--version", version, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port))
    return DesiredState.model_validate_json(retained(port, f"edgellm/v1/groups/{group}/desired")).id


class Load:
    """A client sending short generate requests back to back; counts the ones that fail."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.ok = self.failed = 0
        self.versions: set[str] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = {"prompt": "Say hello.", "max_tokens": 16, "temperature": 0}
        with RpcClient(settings(self.port)) as client:
            while not self.stop.is_set():
                try:
                    reply = client.call("edgellm/v1/bench/rpc/generate", request, timeout=60)
                except Exception:  # a timeout is a failed request too
                    self.failed += 1
                    continue
                if reply.get("ok"):
                    self.ok += 1
                else:
                    self.failed += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--train-examples", type=int, default=32)
    args = p.parse_args()
    base, tuned, adapter_build = models(args.cache, args.train_examples)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, key = tmp / "store", tmp / "signing.key"
        run("keygen", "--out", str(key))
        run("bundle", "build", str(base), "--store", str(store), "--key", str(key), "--name", "smollm2",
            "--version", "1")
        run("bundle", "build", str(tuned), "--store", str(store), "--key", str(key), "--name", "smollm2",
            "--version", "2")
        run("bundle", "build", str(adapter_build), "--store", str(store), "--key", str(key), "--name", "smollm2",
            "--version", "3", "--parent", "1")
        http_port = free_port()
        server = subprocess.Popen([*EDGELLM, "bundle", "serve", "--store", str(store), "--port", str(http_port)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(http_port)
        broker = Broker(tmp).start()
        watch = UpdateWatch(broker.port)
        env = {"EDGELLM_GROUPS": '["bench"]', "EDGELLM_UPDATE__ENABLED": "true",
               "EDGELLM_UPDATE__STATE_DIR": str(tmp / "state"), "EDGELLM_UPDATE__GRACE_SECONDS": "5",
               "EDGELLM_UPDATE__PUBLIC_KEYS": json.dumps([str(key) + ".pub"]), "EDGELLM_LOG_LEVEL": "WARNING",
               "EDGELLM_TELEMETRY_INTERVAL": "30"}
        device = DaemonProcess(tmp, broker.port, base, device="bench", env=env).start()
        url = f"http://127.0.0.1:{http_port}"
        try:
            first = publish(store, url, broker.port, "1")
            full = watch.wait("bench", first, ("SUCCEEDED", "FAILED", "ROLLED_BACK"), timeout=600)
            assert full["state"] == "SUCCEEDED", full
            load = Load(broker.port)
            load.thread.start()
            time.sleep(2)
            started = time.time()
            second = publish(store, url, broker.port, "2")
            update = watch.wait("bench", second, ("SUCCEEDED", "FAILED", "ROLLED_BACK"), timeout=600)
            rollout_s = time.time() - started
            time.sleep(2)
            load.stop.set()
            load.thread.join(90)
            assert update["state"] == "SUCCEEDED", update
            # a second device takes the base, then the same LoRA as an adapter beside the base's exact blocks
            other = DaemonProcess(tmp, broker.port, base, device="bench-adapter",
                                  env={**env, "EDGELLM_GROUPS": '["bench-adapter"]',
                                       "EDGELLM_UPDATE__STATE_DIR": str(tmp / "adapter-state")}).start()
            try:
                first_a = publish(store, url, broker.port, "1", "bench-adapter")
                assert watch.wait("bench-adapter", first_a, ("SUCCEEDED", "FAILED", "ROLLED_BACK"),
                                  timeout=600)["state"] == "SUCCEEDED"
                third = publish(store, url, broker.port, "3", "bench-adapter")
                adapter = watch.wait("bench-adapter", third, ("SUCCEEDED", "FAILED", "ROLLED_BACK"), timeout=600)
                assert adapter["state"] == "SUCCEEDED", adapter
            finally:
                other.stop()
        finally:
            watch.close()
            device.stop()
            broker.stop()
            server.terminate()
        h = update["history"]
        summary = {
            "full_bundle_bytes": full["full_bytes"],
            "full_download_bytes": full["bytes_transferred"],
            "update_bytes_transferred": update["bytes_transferred"],
            "delta_ratio": round(update["bytes_transferred"] / full["full_bytes"], 4),
            "publish_to_succeeded_s": round(rollout_s, 2),
            "download_s": round(h["VERIFYING"] - h["DOWNLOADING"], 2),
            "assemble_s": round(h["TESTING"] - h["VERIFYING"], 2),
            "smoke_test_s": round(h["ACTIVATING"] - h["TESTING"], 2),
            "switch_and_grace_s": round(h["SUCCEEDED"] - h["ACTIVATING"], 2),
            "requests_during_swap": load.ok + load.failed,
            "failed_requests_during_swap": load.failed,
            "adapter_bundle_bytes": adapter["full_bytes"],
            "adapter_update_bytes_transferred": adapter["bytes_transferred"],
            "adapter_delta_ratio": round(adapter["bytes_transferred"] / full["full_bytes"], 4),
        }
    print(f"LoRA update: {summary['update_bytes_transferred'] / 1e6:.1f} MB of a "
          f"{summary['full_bundle_bytes'] / 1e6:.1f} MB bundle ({summary['delta_ratio']:.1%}); publish to SUCCEEDED "
          f"{summary['publish_to_succeeded_s']} s; {summary['failed_requests_during_swap']} of "
          f"{summary['requests_during_swap']} requests failed during the swap", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
