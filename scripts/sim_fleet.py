"""A 200-device rehearsal of a staged rollout: one real mosquitto, one real `edgellm bundle serve`, and 200
devices each running the real update agent (edgellm/daemon/update/agent.py: fetch, verify, assemble, smoke
test in a child process, switch, report) on a tiny random-weight Llama, several devices per process.

What is simulated, and why: a device here is the update agent with its own state folder and MQTT connection,
not a whole `edgellm serve` (200 onnxruntime engines do not fit 2 cores). Switching to a model records it
instead of loading it, and the serving engine's health is the injected fault below. Each host process runs
at most two smoke tests at a time (each is a python process loading the model; a real device has its own
cores). Every device starts on v1, installed in its slot as a factory image would be.

Faults, on 10% of the devices (none in the first stage, so it judges the release alone):
- corrupt: a full-size download of garbage waits in the device's download folder for one of v2's chunks
  (what a link that altered the bytes leaves); the agent must refuse it by its sha256 and fetch it again;
- kill: the devices' host process is killed with SIGKILL mid-download (bandwidth capped so there is a
  middle) and started again; the agent must resume with Range requests;
- smoke: the smoke test gets 1 ms (`update.smoke_timeout`) and fails; the device must roll back.

`--bad-release`: v2 passes its smoke test but 30% of the devices on it report request failures in the grace
period; the rollout (`edgellm.models.fleet.host.run_rollout`, 10% -> 50% -> 100%, abort at 20% failures after 10
reports) must abort in its first stage, no device outside that stage may receive v2, and with the release key
the devices that took it go back to v1.

    .venv/bin/python scripts/sim_fleet.py [--devices 200] [--bad-release]

Prints one JSON line: devices, publish_to_all_succeeded_s (from the release's publication until the last
healthy device finished on the group's final desired state: the release, or after an abort the previous
version published again), bytes_served (body bytes in the bundle server's
access log), bytes_served_per_device, broker_messages (mosquitto's
$SYS/broker/messages/sent, delta over the rollout), aborted, devices_on_bad_release_at_abort,
devices_outside_stage_that_received_it, healthy_devices_left_on_broken_model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUP = "sim"
STAGES = (10.0, 50.0, 100.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the device side: one process hosts many devices ----------------------------------------------------------
class SimDevice:
    """The real update agent with its own state folder and MQTT connection; activating a model records it."""

    def __init__(self, spec: dict, d: dict, smoke_slots: threading.Semaphore):
        from edgellm.daemon.serve.mqtt_api import make_client
        from edgellm.daemon.update.agent import Hooks, UpdateAgent
        from edgellm.daemon.update.settings import UpdateSettings
        from tests.harness import settings

        class Agent(UpdateAgent):
            def _smoke_test(self, slot: Path) -> str | None:
                with smoke_slots:  # the real test, in a child process, two at a time per host process
                    return super()._smoke_test(slot)

        self.name, self.spec, self.d, self.errors = d["name"], spec, d, 0
        self.root = "edgellm/v1"
        self.client = make_client(settings(spec["broker_port"]), f"sim-{self.name}")
        self.client.will_set(f"{self.root}/{self.name}/status", json.dumps({"state": "offline"}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        u = UpdateSettings(enabled=True, public_keys=[spec["public_key"]], retries=3, retry_backoff=0.2, timeout=20,
                           grace_seconds=spec["grace_seconds"],
                           smoke_timeout=0.001 if d["fault"] == "smoke" else 300,
                           max_bytes_per_second=spec["kill_bytes_per_second"] if d["fault"] == "kill" else None)
        hooks = Hooks(publish=self._publish, activate=self._activate, health_problem=lambda: None,
                      internal_errors=lambda: self.errors)
        self.agent = Agent(u, self.name, [GROUP], Path(d["state_dir"]), hooks)
        self.agent.recover()

    def start(self) -> None:
        self.client.connect("127.0.0.1", self.spec["broker_port"])
        self.client.loop_start()
        self.agent.start()

    def stop(self) -> None:
        self.agent.shutdown()
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, *_) -> None:
        client.subscribe([(f"{self.root}/groups/{GROUP}/desired", 1), (f"{self.root}/{self.name}/desired", 1)])
        self._presence()

    def _on_message(self, _c, _u, msg) -> None:
        self.agent.on_desired("device" if msg.topic.endswith(f"/{self.name}/desired") else GROUP, msg.payload)

    def _publish(self, report) -> None:
        self.client.publish(f"{self.root}/{self.name}/update", report.model_dump_json(), qos=1, retain=True)
        if report.state.terminal:
            self._presence()

    def _presence(self) -> None:
        body = {"state": "online", "device": self.name, "groups": [GROUP], "ts": time.time(),
                "bundle": self.agent.active_bundle()}
        self.client.publish(f"{self.root}/{self.name}/status", json.dumps(body), qos=1, retain=True)

    def _activate(self, path: Path | None) -> None:
        """The injected fault of --bad-release: on v2, requests on an unlucky device fail (the agent counts
        them in its grace period)."""
        bad = self.spec["bad_version"]
        self.errors = int(bool(path and bad and self.d["unlucky"] and path.name.endswith(f"-{bad}")))


def host_devices(spec_path: Path) -> None:
    """Run the devices in the spec until SIGTERM."""
    spec = json.loads(spec_path.read_text())
    smoke_slots = threading.Semaphore(2)
    devices = [SimDevice(spec, d, smoke_slots) for d in spec["devices"]]
    for device in devices:
        device.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    for device in devices:
        device.stop()


# -- the host side ----------------------------------------------------------------------------------------------
def make_release(work: Path) -> tuple[Path, Path, Path]:
    """v1 (a tiny random Llama, int4) and v2 (its q/v projections changed, as a LoRA merge would), signed into
    a store."""
    import torch

    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle, keygen
    from tests.tiny_models import make_tiny_model

    store, key = work / "store", work / "release.key"
    if (store / "bundles/tiny/2/bundle.json").is_file():
        return store, key, Path(str(key) + ".pub")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = make_tiny_model("llama", work / "source-v1")
    tuned = work / "source-v2"
    shutil.copytree(source, tuned)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tuned)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tuned)
    keygen(key)
    for version, folder in (("1", source), ("2", tuned)):
        build_model(str(folder), work / f"v{version}", BuildOptions(QuantSpec("int4"), show_progress=False))
        build_bundle(work / f"v{version}", store, key, BundleOptions(name="tiny", version=version))
    return store, key, Path(str(key) + ".pub")


def install_v1(state_dir: Path, store: Path) -> None:
    """The factory image: v1 in the device's active slot, as `bundle build` chunked it."""
    from edgellm.daemon.update.bundle import BundleManifest, bundle_path, chunk_path
    from edgellm.daemon.update.slots import ActiveState, SlotStore

    slots = SlotStore(state_dir)
    body = (store / bundle_path("tiny", "1")).read_bytes()
    manifest = BundleManifest.model_validate_json(body)
    for sha in manifest.unique_chunks():
        shutil.copyfile(store / chunk_path(sha), slots.downloads / sha)
    slot = slots.assemble(manifest, body, (store / bundle_path("tiny", "1", "bundle.json.sig")).read_bytes())
    slots.set_state(ActiveState(active=slot.name))
    slots.collect_garbage()


def plant_corrupt_chunk(state_dir: Path, store: Path) -> None:
    from edgellm.daemon.update.bundle import BundleManifest, bundle_path

    manifest = BundleManifest.model_validate_json((store / bundle_path("tiny", "2")).read_bytes())
    old = BundleManifest.model_validate_json((store / bundle_path("tiny", "1")).read_bytes()).unique_chunks()
    sha, size = next((s, n) for s, n in sorted(manifest.unique_chunks().items(), key=lambda x: -x[1]) if s not in old)
    (state_dir / "downloads" / f"{sha}.part").write_bytes(os.urandom(size))


def broker_sent(port: int) -> int:
    out = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", "$SYS/broker/messages/sent", "-C", "1", "-W", "30"],
                         capture_output=True, text=True, timeout=40)
    return int(out.stdout.strip() or 0)


def bytes_served(access_log: Path) -> int:
    """Body bytes in `bundle serve`'s access log (nginx's format: the last field)."""
    return sum(int(line.rsplit(" ", 1)[1]) for line in access_log.read_text().splitlines() if '" ' in line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--per-process", type=int, default=50)
    p.add_argument("--bad-release", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/sim-fleet")
    p.add_argument("--grace-seconds", type=float, default=3.0)
    p.add_argument("--soak", type=float, default=5.0)
    p.add_argument("--host-devices", type=Path, help=argparse.SUPPRESS)  # a device host process
    args = p.parse_args()
    if args.host_devices:
        host_devices(args.host_devices)
        return

    from edgellm.daemon.update.bundle import BundleManifest, DesiredState, in_rollout, rollout_bucket
    from edgellm.models.fleet.bundles import desired_state
    from edgellm.models.fleet.host import FleetWatch, publish_desired, run_rollout
    from edgellm.models.fleet.rollout import RolloutHistory, RolloutPlan, RolloutState
    from tests.harness import EDGELLM, Broker, free_port, wait_for_port
    from tests.harness import settings as harness_settings

    store, key, public = make_release(args.work / "release")
    run_dir = args.work / ("bad" if args.bad_release else "good")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    names = [f"sim-{i:03d}" for i in range(args.devices)]
    first_stage = [n for n in names if in_rollout(n, STAGES[0])]
    later = [n for n in names if n not in first_stage]
    n_faults = round(0.1 * args.devices)
    step = max(len(later) // max(n_faults, 1), 1)
    faulty = later[::step][:n_faults]
    faults = {n: ("corrupt", "kill", "smoke")[i % 3] for i, n in enumerate(faulty)}
    by_bucket = sorted(names, key=rollout_bucket)  # 3 in every 10 along the buckets: 30% of every stage
    unlucky = {n for i, n in enumerate(by_bucket) if i % 10 < 3} if args.bad_release else set()
    log(f"{args.devices} devices, {len(first_stage)} in the first stage; faults: "
        f"{sorted(faults.values()).count('corrupt')} corrupt, {sorted(faults.values()).count('kill')} kill, "
        f"{sorted(faults.values()).count('smoke')} smoke" + (f"; {len(unlucky)} fail on v2" if unlucky else ""))

    broker = Broker(run_dir, conf="listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\n"
                                  "max_queued_messages 100000\n").start()
    settings = harness_settings(broker.port)
    port = free_port()
    access_log = run_dir / "store-access.log"
    server = subprocess.Popen([*EDGELLM, "bundle", "serve", "--store", str(store), "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(access_log, "w"))
    wait_for_port(port, 60)
    url = f"http://127.0.0.1:{port}"
    hosts: dict[str, tuple[Path, subprocess.Popen | None]] = {}
    try:
        specs = []
        for n in names:
            state_dir = run_dir / "devices" / n
            install_v1(state_dir, store)
            if faults.get(n) == "corrupt":
                plant_corrupt_chunk(state_dir, store)
            specs.append({"name": n, "state_dir": str(state_dir), "fault": faults.get(n), "unlucky": n in unlucky})
        killed = [s for s in specs if s["fault"] == "kill"]
        groups = {"kill": killed}
        rest = [s for s in specs if s["fault"] != "kill"]
        for i in range(0, len(rest), args.per_process):
            groups[f"host{i // args.per_process}"] = rest[i:i + args.per_process]
        common = {"broker_port": broker.port, "public_key": str(public), "grace_seconds": args.grace_seconds,
                  "bad_version": "2" if args.bad_release else None, "kill_bytes_per_second": 4096}

        def start_host(label: str) -> subprocess.Popen:
            spec = run_dir / f"{label}.json"
            spec.write_text(json.dumps({**common, "devices": groups[label]}))
            proc = subprocess.Popen([sys.executable, __file__, "--host-devices", str(spec)], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=open(run_dir / f"{label}.log", "a"), text=True)
            assert proc.stdout.readline().strip() == "ready", f"device host {label} did not start"
            return proc

        for label in groups:
            hosts[label] = (run_dir / f"{label}.json", start_host(label))
        # the group runs v1: the desired state an abort goes back to
        v1 = desired_state(store, url, "tiny", "1", 100)
        publish_desired(settings, f"{settings.topic_root}/groups/{GROUP}/desired", v1)
        watch = FleetWatch(settings).start()
        deadline = time.monotonic() + 300
        while sum(r.update.get("desired_id") == v1.id and r.update.get("state") == "SUCCEEDED"
                  for r in watch.snapshot().values()) < len(names):
            assert time.monotonic() < deadline, "devices did not settle on v1"
            time.sleep(0.5)
        log("all devices on v1")

        if killed:  # it waits for one of them to be downloading v2
            threading.Thread(target=kill_mid_download, args=(watch, killed, hosts, start_host), daemon=True).start()
        sent0, served0, started = broker_sent(broker.port), bytes_served(access_log), time.time()
        plan = RolloutPlan(STAGES, soak_seconds=args.soak, abort_percent=20, abort_min_reports=10,
                           stage_timeout=600)
        release = desired_state(store, url, "tiny", "2", STAGES[0])
        at_abort: dict = {}
        aborted_at: list[float] = []

        def on_status(status) -> None:
            if status.state is RolloutState.ABORTED and not at_abort:
                aborted_at.append(time.time())
                at_abort.update({n: dict(r.update) for n, r in watch.snapshot().items()
                                 if r.update.get("desired_id") == release.id})

        status = run_rollout(settings, GROUP, release, plan, RolloutHistory(run_dir / "rollouts.sqlite"), key,
                             poll=0.5, on_status=on_status)
        log(f"rollout {status.state}: {status.reason}")
        final = DesiredState.model_validate(watch.desired[GROUP])
        healthy = [n for n in names if faults.get(n) != "smoke" and n not in unlucky]
        deadline = time.monotonic() + 600
        while True:  # every healthy device has finished with the group's final desired state
            rows = watch.snapshot()
            done = [n for n in healthy if rows[n].update.get("desired_id") == final.id
                    and rows[n].update.get("state") in ("SUCCEEDED", "FAILED", "ROLLED_BACK")
                    and rows[n].presence.get("state") == "online"]
            if len(done) == len(healthy) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        all_done_s = max(rows[n].update.get("finished_at") or 0 for n in healthy) - started
        sent, served = broker_sent(broker.port) - sent0, bytes_served(access_log) - served0
        bad_version = "2" if args.bad_release else None
        result = {
            "devices": len(names),
            "release": "bad" if args.bad_release else "good",
            "rollout_state": str(status.state),
            "publish_to_all_succeeded_s": round(all_done_s, 1),
            "healthy_devices_succeeded": sum(rows[n].update.get("state") == "SUCCEEDED" for n in healthy),
            "healthy_devices": len(healthy),
            "fault_devices": {k: sum(1 for f in faults.values() if f == k) for k in ("corrupt", "kill", "smoke")},
            "fault_devices_succeeded": sum(rows[n].update.get("state") == "SUCCEEDED" and
                                           rows[n].presence.get("bundle", {}).get("version") == final.version
                                           for n in faults if faults[n] != "smoke"),
            "smoke_fault_devices_rolled_back": sum(rows[n].update.get("state") == "ROLLED_BACK"
                                                   for n in faults if faults[n] == "smoke"),
            "bundle_bytes": BundleManifest.model_validate_json((store / "bundles/tiny/2/bundle.json")
                                                               .read_bytes()).total_bytes,
            "bytes_served": served,
            "bytes_served_per_device": round(served / len(names)),
            "broker_messages": sent,
            "aborted": status.state is RolloutState.ABORTED,
            "abort_stage": status.stage + 1 if status.state is RolloutState.ABORTED else None,
            "publish_to_abort_s": round(aborted_at[0] - started, 1) if aborted_at else None,
            "devices_on_bad_release_at_abort": sum(r.get("state") in ("ACTIVATING", "SUCCEEDED")
                                                   for r in at_abort.values()),
            "devices_outside_stage_that_received_it": sum(n not in first_stage for n in at_abort)
            if args.bad_release else None,
            "healthy_devices_left_on_broken_model": sum(
                (rows[n].presence.get("bundle") or {}).get("version") == bad_version for n in healthy)
            if bad_version else 0,
        }
        watch.stop()
    finally:
        for _, proc in hosts.values():
            if proc and proc.poll() is None:
                proc.terminate()
        for _, proc in hosts.values():
            if proc:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        server.terminate()
        broker.stop()
    print(json.dumps(result))


def kill_mid_download(watch, killed: list[dict], hosts: dict, start_host) -> None:
    """SIGKILL the host of the `kill` devices once one of them is downloading v2, then start it again."""
    names = {d["name"] for d in killed}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rows = watch.snapshot()
        if any(rows[n].update.get("state") == "DOWNLOADING" and (rows[n].update.get("bytes_done") or 0) > 0
               and rows[n].update.get("version") == "2" for n in names if n in rows):
            break
        time.sleep(0.1)
    else:
        return  # none of them downloaded v2 (a release aborted before their stage)
    spec, proc = hosts["kill"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log(f"killed the host of {len(names)} devices mid-download")
    time.sleep(1)
    hosts["kill"] = (spec, start_host("kill"))


if __name__ == "__main__":
    main()
