"""Fleet updates end to end, with real processes on loopback: `edgellm bundle serve` (HTTP with Range), a
mosquitto broker, and device daemons with their own state directories. The update is a real LoRA merge of a
tiny Llama, built to int4, chunked and signed with Ed25519."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgellm.daemon.update.bundle import BundleManifest, DesiredState, chunk_path, in_rollout
from tests.conftest import build
from tests.harness import (
    EDGELLM,
    ROOT,
    Broker,
    DaemonProcess,
    Nginx,
    free_port,
    retained,
    rpc,
    wait_for_port,
    wait_until,
)


# -- the host side: models, keys, bundles, the store server ----------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_sources):
    """v1 (the tiny Llama, int4), v2 (v1 plus a merged q/v LoRA, int4) and stores to serve them from."""
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle, keygen, load_private_key, sign
    from edgellm.models.tuning.lora import LoraOptions, merge_lora, train_lora

    root = tmp_path_factory.mktemp("fleet")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                            for w in ["invoice", "factura", "facture", "contract"] * 4))
    train_lora(str(tiny_sources["llama"]), data, root / "adapter",
               LoraOptions(epochs=4, batch_size=4, learning_rate=0.05, show_progress=False))
    merge_lora(str(tiny_sources["llama"]), root / "adapter", root / "merged")
    v1 = build(tiny_sources["llama"], root / "v1", "int4")
    v2 = build(root / "merged", root / "v2", "int4")
    keygen(root / "signing.key")
    keygen(root / "rogue.key")
    stores = root / "stores"
    main, other, tamper = stores / "main", stores / "other", stores / "tamper"
    key = root / "signing.key"
    build_bundle(v1, main, key, BundleOptions(name="tiny", version="1"))
    build_bundle(v2, main, key, BundleOptions(name="tiny", version="2"))
    wrong = root / "golden-wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "Say invoice.", "expected": "a reply this model never gives"}) + "\n")
    build_bundle(v2, other, key, BundleOptions(name="bad-golden", version="1", golden=wrong))
    build_bundle(v2, other, root / "rogue.key", BundleOptions(name="rogue", version="1"))
    build_bundle(v2, tamper, key, BundleOptions(name="tampered", version="1"))  # its own store: chunks are shared
    tampered = json.loads((tamper / "bundles/tampered/1/bundle.json").read_text())
    biggest = max((c for f in tampered["files"] for c in f["chunks"]), key=lambda c: c["size"])
    target = tamper / chunk_path(biggest["sha256"])
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    escape = json.loads((main / "bundles/tiny/1/bundle.json").read_text())  # a signed manifest that escapes
    escape["name"], escape["version"] = "escape", "1"
    escape["files"].append({**escape["files"][-1], "path": "../../../../tmp/edgellm-escaped"})
    escape_body = json.dumps(escape).encode()
    folder = other / "bundles/escape/1"
    folder.mkdir(parents=True)
    (folder / "bundle.json").write_bytes(escape_body)
    (folder / "bundle.json.sig").write_bytes(sign(escape_body, load_private_key(key)))
    port = free_port()
    server = subprocess.Popen([*EDGELLM, "bundle", "serve", "--store", str(stores),
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield {"root": root, "v1": v1, "v2": v2, "url": f"http://127.0.0.1:{port}", "main": main, "other": other,
           "tamper": tamper, "public": root / "signing.key.pub"}
    server.terminate()
    server.wait(10)


def device(tmp_path: Path, broker: Broker, fleet: dict, name: str, **update) -> DaemonProcess:
    """A daemon whose factory model is v1 (not from a bundle), following group 'lab'."""
    env = {"EDGELLM_GROUPS": '["lab"]', "EDGELLM_UPDATE__ENABLED": "true",
           "EDGELLM_UPDATE__STATE_DIR": str(tmp_path / f"state-{name}"),
           "EDGELLM_UPDATE__PUBLIC_KEYS": json.dumps([str(fleet["public"])]),
           "EDGELLM_UPDATE__GRACE_SECONDS": "1", "EDGELLM_UPDATE__RETRIES": "2",
           "EDGELLM_UPDATE__RETRY_BACKOFF": "0.1", "EDGELLM_MODEL__THREADS": "1"}
    env.update({f"EDGELLM_UPDATE__{k.upper()}": str(v) for k, v in update.items()})
    return DaemonProcess(tmp_path, broker.port, fleet["v1"], device=name, env=env)


def publish(fleet: dict, broker: Broker, name: str, version: str, scope: str = "groups/lab",
            percent: float = 100, store: str = "main", *extra: str, server: str | None = None) -> str:
    """Through the real CLI, as an operator would; `server` is the store server's URL (default `bundle serve`)."""
    args = [*EDGELLM, "bundle", "publish", "--store", str(fleet[store]),
            "--url", f"{server or fleet['url']}/{store}", "--name", name, "--version", version,
            "--percent", str(percent), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), *extra]
    args += ["--group", scope.split("/", 1)[1]] if scope.startswith("groups/") else ["--device", scope]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    topic = f"edgellm/v1/{scope}/desired"
    return DesiredState.model_validate_json(retained(broker.port, topic)).id


def chunks_of(store: Path, name: str, version: str) -> dict[str, int]:
    manifest = json.loads((store / f"bundles/{name}/{version}/bundle.json").read_text())
    return {c["sha256"]: c["size"] for f in manifest["files"] for c in f["chunks"]}


def serving(broker: Broker, name: str) -> dict:
    with rpc(broker.port) as client:
        return client.call(f"edgellm/v1/{name}/rpc/status", {}, timeout=30)


def answer(broker: Broker, name: str) -> dict:
    with rpc(broker.port) as client:
        request = {"prompt": "Say invoice.", "max_tokens": 4, "temperature": 0}
        return client.call(f"edgellm/v1/{name}/rpc/generate", request, timeout=60)


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_group_update_staged_rollout_and_delta(tmp_path, broker, fleet, watch):
    names = ["gw-a", "gw-b", "gw-c"]
    devices = [device(tmp_path, broker, fleet, n).start() for n in names]
    try:
        first = publish(fleet, broker, "tiny", "1")
        full = {n: watch.wait(n, first, ("SUCCEEDED",)) for n in names}
        states = watch.states("gw-a", first)
        assert [s for s in ["QUEUED", "DOWNLOADING", "VERIFYING", "TESTING", "ACTIVATING", "SUCCEEDED"]
                if s in states] == ["QUEUED", "DOWNLOADING", "VERIFYING", "TESTING", "ACTIVATING", "SUCCEEDED"]
        assert all(serving(broker, n)["bundle"] == {"name": "tiny", "version": "1"} for n in names)

        # a staged rollout: 50% reaches exactly the devices whose stable bucket is below 50
        chosen = [n for n in names if in_rollout(n, 50)]
        assert 0 < len(chosen) < len(names), "pick device names that split at 50%"
        staged = publish(fleet, broker, "tiny", "2", percent=50)
        for n in chosen:
            watch.wait(n, staged, ("SUCCEEDED",))
        time.sleep(2)
        for n in set(names) - set(chosen):
            assert watch.states(n, staged) == [], f"{n} is outside the 50% rollout but acted on it"
            assert serving(broker, n)["bundle"]["version"] == "1"

        # the rest follow at 100%, fetching only the chunks the LoRA merge changed, while requests keep coming
        late = next(n for n in names if n not in chosen)
        replies: list[dict] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                replies.append(answer(broker, late))

        loader = threading.Thread(target=load)
        loader.start()
        everyone = publish(fleet, broker, "tiny", "2")
        delta = {n: watch.wait(n, everyone if n not in chosen else staged, ("SUCCEEDED",)) for n in names}
        stop.set()
        loader.join(60)
        assert replies and all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
        for n in names:
            assert serving(broker, n)["bundle"] == {"name": "tiny", "version": "2"}
            assert answer(broker, n)["ok"]
        ratio = delta[late]["bytes_transferred"] / full[late]["bytes_transferred"]
        print(f"\nLoRA update: {delta[late]['bytes_transferred']} of {full[late]['full_bytes']} bytes "
              f"(full download {full[late]['bytes_transferred']}): delta ratio {ratio:.3f}")
        assert full[late]["bytes_transferred"] >= full[late]["full_bytes"]  # the factory model was no bundle
        old, new = (chunks_of(fleet["main"], "tiny", v) for v in ("1", "2"))
        changed = sum(size for sha, size in new.items() if sha not in old)
        signed = sum(len((fleet["main"] / f"bundles/tiny/2/{f}").read_bytes()) for f in ("bundle.json",
                                                                                          "bundle.json.sig"))
        assert 0 < changed < sum(new.values())
        # exactly the chunks it did not hold, each as its delta against the old chunk where the store has one
        manifest = BundleManifest.model_validate_json((fleet["main"] / "bundles/tiny/2/bundle.json").read_bytes())
        sent = sum(manifest.deltas()[sha].size if sha in manifest.deltas() else size
                   for sha, size in new.items() if sha not in old)
        assert manifest.deltas() and sent < changed
        assert delta[late]["bytes_transferred"] == sent + signed
        state = tmp_path / f"state-{late}"
        assert sorted(p.name for p in (state / "slots").iterdir()) == ["tiny-1", "tiny-2"]  # active + previous
        assert list((state / "downloads").iterdir()) == []
        assert json.loads((state / "active.json").read_text()) == {"active": "tiny-2", "previous": "tiny-1",
                                                                   "trial": None}

        out = subprocess.run([*EDGELLM, "fleet", "status", "--once", "--wait", "1",
                              "--json", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        rows = {r["device"]: r for r in json.loads(out.stdout)["devices"]}
        assert sorted(rows) == names
        assert all(r["state"] == "online" and r["version"] == "2" and r["update"] == "SUCCEEDED"
                   for r in rows.values()), rows
    finally:
        for d in devices:
            d.stop()


@pytest.mark.slow
def test_tampered_unknown_key_and_failing_model_leave_the_active_model(tmp_path, broker, fleet, watch):
    d = device(tmp_path, broker, fleet, "gw-solo").start()
    try:
        before = serving(broker, "gw-solo")["model"]
        tampered = publish(fleet, broker, "tampered", "1", scope="gw-solo", store="tamper")
        report = watch.wait("gw-solo", tampered, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "FAILED" and "sha256" in report["reason"], report

        rogue = publish(fleet, broker, "rogue", "1", scope="gw-solo", store="other")
        report = watch.wait("gw-solo", rogue, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "FAILED" and "trusted keys" in report["reason"], report
        assert "DOWNLOADING" not in watch.states("gw-solo", rogue) or report.get("bytes_done", 0) == 0

        bad = publish(fleet, broker, "bad-golden", "1", scope="gw-solo", store="other")
        report = watch.wait("gw-solo", bad, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "ROLLED_BACK" and "golden prompt 1" in report["reason"], report

        status = serving(broker, "gw-solo")
        assert status["model"] == before and status["bundle"] is None
        assert answer(broker, "gw-solo")["ok"]
        assert sorted(p.name for p in (tmp_path / "state-gw-solo" / "slots").iterdir()) == []
    finally:
        d.stop()


@pytest.mark.slow
def test_kill_during_download_resumes_with_range(tmp_path, broker, fleet, watch):
    d = device(tmp_path, broker, fleet, "gw-slow", max_bytes_per_second=40_000).start()
    desired = publish(fleet, broker, "tiny", "2")
    deadline = time.monotonic() + 60
    while not any(r.get("bytes_done", 0) > 60_000 for r in watch.reports.get("gw-slow", [])
                  if r.get("state") == "DOWNLOADING"):
        assert time.monotonic() < deadline, watch.reports.get("gw-slow")
        time.sleep(0.1)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    total = sum(chunks_of(fleet["main"], "tiny", "2").values())
    on_disk = sum(p.stat().st_size for p in (tmp_path / "state-gw-slow" / "downloads").iterdir())
    assert 60_000 < on_disk < total  # what it had downloaded when killed is kept, for the range request
    restarted = device(tmp_path, broker, fleet, "gw-slow")
    restarted.start()
    try:
        report = watch.wait("gw-slow", desired, ("SUCCEEDED", "FAILED", "ROLLED_BACK"))
        assert report["state"] == "SUCCEEDED", report
        resumed = [r for r in watch.reports["gw-slow"] if r.get("state") == "DOWNLOADING"][-1]
        assert resumed["bytes_transferred"] <= total - on_disk + 20_000  # only what was missing (+ manifest)
        assert serving(broker, "gw-slow")["bundle"]["version"] == "2"
    finally:
        restarted.stop()


@pytest.mark.slow
def test_kill_during_grace_period_rolls_back_to_a_complete_model(tmp_path, broker, fleet, watch):
    d = device(tmp_path, broker, fleet, "gw-crash").start()
    first = publish(fleet, broker, "tiny", "1", scope="gw-crash")
    watch.wait("gw-crash", first, ("SUCCEEDED",))
    d.stop()
    d = device(tmp_path, broker, fleet, "gw-crash", grace_seconds=60).start()
    second = publish(fleet, broker, "tiny", "2", scope="gw-crash")
    watch.wait("gw-crash", second, ("ACTIVATING",))
    # switched, and inside the grace period (60 s) when it is killed
    wait_until(lambda: serving(broker, "gw-crash")["bundle"]["version"] == "2", 30, "the switch")
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d = device(tmp_path, broker, fleet, "gw-crash").start()
    try:
        report = watch.wait("gw-crash", second, ("ROLLED_BACK", "SUCCEEDED", "FAILED"))
        assert report["state"] == "ROLLED_BACK" and "restarted" in report["reason"], report
        assert serving(broker, "gw-crash")["bundle"] == {"name": "tiny", "version": "1"}
        assert answer(broker, "gw-crash")["ok"]
    finally:
        d.stop()


def test_a_chunk_delta_rebuilds_the_chunk_or_nothing():
    from edgellm.daemon.update.delta import apply_delta, make_delta

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    new = bytearray(base)
    for i in rng.choice(len(base), 500, replace=False):  # a merge moves a few bits of some weights
        new[i] ^= 1 << int(rng.integers(0, 4))
    new = bytes(new)
    delta = make_delta(new, base)
    assert len(delta) < len(new) / 4
    assert apply_delta(delta, base, hashlib.sha256(new).hexdigest()) == new
    assert apply_delta(delta, base[::-1], hashlib.sha256(new).hexdigest()) is None  # another base: refused
    assert apply_delta(delta[:-3], base, hashlib.sha256(new).hexdigest()) is None  # cut short: refused


def test_bundle_manifest_records_lineage(fleet):
    lineage = json.loads((fleet["main"] / "bundles/tiny/2/bundle.json").read_text())["lineage"]
    data = (fleet["root"] / "train.jsonl").read_bytes()
    assert lineage["training_data_sha256"] == hashlib.sha256(data).hexdigest()
    assert lineage["adapter"]["sha256"] and lineage["training"]["target_modules"] == ["q_proj", "v_proj"]
    assert lineage["evaluation"]["perplexity"]["perplexity"] > 0
    assert json.loads((fleet["main"] / "bundles/tiny/1/bundle.json").read_text())["lineage"]["adapter"] is None


def resume_largest_chunk(tmp_path: Path, fleet: dict, server: str, held: float) -> tuple[dict, bytes, bytes, int]:
    """Fetch v1's largest chunk from `server` with the first `held` share already in its .part file:
    (chunk, its bytes in the store, the bytes fetched, the bytes sent over the network)."""
    from edgellm.daemon.update.fetch import Fetcher, FetchOptions

    manifest = json.loads((fleet["main"] / "bundles/tiny/1/bundle.json").read_text())
    chunk = max((c for f in manifest["files"] for c in f["chunks"]), key=lambda c: c["size"])
    source = (fleet["main"] / chunk_path(chunk["sha256"])).read_bytes()
    dest = tmp_path / chunk["sha256"]
    Path(str(dest) + ".part").write_bytes(source[: int(len(source) * held)])
    fetcher = Fetcher(f"{server}/main", FetchOptions(retries=0), threading.Event())
    fetcher.get_chunk(chunk_path(chunk["sha256"]), dest, chunk["sha256"], chunk["size"])
    return chunk, source, dest.read_bytes(), fetcher.transferred


def test_fetcher_resumes_a_partial_chunk_with_a_range_request(tmp_path, fleet):
    _, source, fetched, transferred = resume_largest_chunk(tmp_path, fleet, fleet["url"], 0.5)
    assert fetched == source
    assert transferred == len(source) - int(len(source) * 0.5)


@pytest.mark.slow
def test_cli_refuses_bad_fleet_input(tmp_path, fleet):
    def run(*args):
        return subprocess.run([*EDGELLM, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    out = run("bundle", "build", str(fleet["v1"]), "--store", str(tmp_path / "s"), "--key", str(fleet["public"]))
    assert out.returncode == 2 and "--key" in out.stderr
    out = run("bundle", "build", str(fleet["v1"]), "--store", str(fleet["main"]), "--key",
              str(fleet["root"] / "signing.key"), "--name", "tiny", "--version", "1")
    assert out.returncode == 2 and "already" in out.stderr
    out = run("bundle", "publish", "--store", str(tmp_path), "--group", "lab", "--mqtt-port", "1")
    assert out.returncode == 2 and "no bundle" in out.stderr
    shutil.copy(fleet["public"], tmp_path / "k.pub")
    out = run("keygen", "--out", str(tmp_path / "k"))
    assert out.returncode == 2 and "--force" in out.stderr
    from edgellm.daemon.errors import CommandError
    from edgellm.daemon.serve.settings import load_settings

    with pytest.raises(CommandError, match="update.public_keys"):
        load_settings(None, {"update": {"enabled": True}})


def test_smoke_test_holds_the_model_to_its_perplexity_bound(tmp_path, fleet):
    """The check the device runs in a child process, on a slot whose signed bound the model misses."""
    slot = tmp_path / "slot"
    shutil.copytree(fleet["v2"], slot)
    bundle = json.loads((fleet["main"] / "bundles/tiny/2/bundle.json").read_text())
    (slot / "smoke_eval.txt").write_bytes(b"".join(
        (fleet["main"] / chunk_path(c["sha256"])).read_bytes()
        for f in bundle["files"] if f["path"] == "smoke_eval.txt" for c in f["chunks"]))
    for bound, ok in ((bundle["smoke"]["max_perplexity"], True), (1.0, False)):
        bundle["smoke"]["max_perplexity"] = bound
        (slot / "bundle.json").write_text(json.dumps(bundle))
        out = subprocess.run([sys.executable, "-m", "edgellm.daemon.update.smoke", str(slot)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        report = json.loads(out.stdout)
        assert (out.returncode == 0) == ok and report["ok"] == ok, report
    assert "perplexity" in report["problems"][0] and "bound" in report["problems"][0]


@pytest.mark.slow
def test_a_manifest_path_outside_the_slot_fails_before_any_download(tmp_path, broker, fleet, watch):
    escaped = Path("/tmp/edgellm-escaped")
    escaped.unlink(missing_ok=True)
    d = device(tmp_path, broker, fleet, "gw-escape").start()
    try:
        desired = publish(fleet, broker, "escape", "1", "gw-escape", 100, "other")
        report = watch.wait("gw-escape", desired, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "FAILED" and "'..'" in report["reason"], report
        assert "DOWNLOADING" not in watch.states("gw-escape", desired)
        assert not escaped.exists() and serving(broker, "gw-escape")["bundle"] is None
    finally:
        d.stop()


@pytest.mark.slow
def test_an_older_version_is_refused_unless_a_release_key_allows_the_downgrade(tmp_path, broker, fleet, watch):
    """A replayed desired state for v1 (validly signed long ago) must not take a v2 device back."""
    import httpx

    http_port = free_port()
    d = device(tmp_path, broker, fleet, "gw-down").start()
    d.stop()
    d = DaemonProcess(tmp_path, broker.port, fleet["v1"], device="gw-down", env={
        **{k: v for k, v in d.env.items() if k.startswith("EDGELLM_UPDATE") or k == "EDGELLM_GROUPS"},
        "EDGELLM_HTTP__ENABLED": "true", "EDGELLM_HTTP__PORT": str(http_port)}).start()
    try:
        v2 = publish(fleet, broker, "tiny", "2", "gw-down")
        watch.wait("gw-down", v2, ("SUCCEEDED",))
        # the retained status is refreshed right after the report; a reader may see it a moment later
        deadline = time.monotonic() + 10
        while True:
            status = json.loads(retained(broker.port, "edgellm/v1/gw-down/status"))
            if status["update_state"] == "SUCCEEDED" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["update_state"] == "SUCCEEDED" and status["bundle"]["version"] == "2"  # refreshed, retained
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics").text
        assert 'edgellm_update_info{state="SUCCEEDED"} 1.0' in metrics

        replayed = publish(fleet, broker, "tiny", "1", "gw-down")
        report = watch.wait("gw-down", replayed, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "FAILED" and "downgrade refused" in report["reason"], report
        assert serving(broker, "gw-down")["bundle"] == {"name": "tiny", "version": "2"}

        rollback = publish(fleet, broker, "tiny", "1", "gw-down", 100, "main", "--allow-downgrade", "--key",
                           str(fleet["root"] / "signing.key"))
        report = watch.wait("gw-down", rollback, ("FAILED", "ROLLED_BACK", "SUCCEEDED"))
        assert report["state"] == "SUCCEEDED", report
        assert serving(broker, "gw-down")["bundle"] == {"name": "tiny", "version": "1"}
    finally:
        d.stop()


@pytest.mark.slow
def test_fleet_status_fits_80_columns_and_forgets_a_retired_device(broker):
    """Retained presence as devices publish it; `fleet forget` clears a retired one on the real broker."""
    mqtt = ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port)]
    now = time.time()
    presence = {
        "warehouse-gateway-east-07": {"state": "online", "ts": now, "bundle": {"version": "2026.11.30-rc1"},
                                      "model": {"name": "invoices-smollm2-135m-keep-base", "version": "3"}},
        "gw-old": {"state": "offline", "ts": now - 90000, "model": {"name": "smollm2", "version": "1"}},
    }
    updates = {"warehouse-gateway-east-07": {"state": "FAILED", "name": "invoices", "version": "4",
                                             "reason": "smoke test: perplexity 81.2 above the bundle's limit 40"}}
    messages = {f"edgellm/v1/{d}/status": json.dumps(p) for d, p in presence.items()}
    messages.update({f"edgellm/v1/{d}/update": json.dumps(u) for d, u in updates.items()})
    for topic, payload in messages.items():
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-r", "-t", topic, "-m", payload],
                       check=True, timeout=10)

    def status(*flags):
        out = subprocess.run([*EDGELLM, "fleet", "status", "--once", "--wait", "1", *flags, *mqtt], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    table = status().splitlines()
    assert max(map(len, table)) <= 80, "\n".join(table)
    assert sum("warehouse-" in line for line in table) == 1 and sum("gw-old" in line for line in table) == 1
    assert any("FAILED" in line and "1d" not in line for line in table) and any("1d" in line for line in table)
    out = subprocess.run([*EDGELLM, "fleet", "forget", "gw-old", *mqtt], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "forgot gw-old" in out.stdout, out.stderr
    assert [r["device"] for r in json.loads(status("--json"))["devices"]] == ["warehouse-gateway-east-07"]
    out = subprocess.run([*EDGELLM, "fleet", "forget", "gw/+", *mqtt], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "DEVICE" in out.stderr


@pytest.mark.slow
def test_pull_a_signed_bundle_by_url_into_the_library_without_torch(tmp_path, fleet):
    """`edgellm pull URL --key KEY.pub` on a device: verified, fetched by chunks, no host packages imported."""
    env = {**os.environ, "EDGELLM_HOME": str(tmp_path / "home")}
    no_host = ("import sys\nfor m in ('torch', 'transformers', 'optimum', 'gguf', 'peft', 'onnx', 'dask'):\n"
               "    sys.modules[m] = None  # importing one of them now fails\n"
               "from edgellm.daemon.cli import main\nsys.exit(main(sys.argv[1:]))")

    def edgellm(*args, device_only=False):
        command = [sys.executable, "-c", no_host] if device_only else EDGELLM
        return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    key = ["--key", str(fleet["public"])]
    out = edgellm("pull", f"{fleet['url']}/main/bundles/tiny/2", *key, device_only=True)
    assert out.returncode == 0 and "pulled tiny 2" in out.stderr, out.stderr
    listed = edgellm("models", "list", device_only=True)
    assert listed.returncode == 0 and "tiny" in listed.stdout, listed.stderr
    model = tmp_path / "home/models/tiny"
    assert (model / "bundle.json.sig").is_file() and not list((tmp_path / "home/models").glob(".pull-*"))
    assert edgellm("run", "tiny", "Say invoice.", "--max-tokens", "3", device_only=True).returncode == 0
    out = edgellm("pull", f"{fleet['url']}/main/", *key, "--name", "newest", device_only=True)  # latest.json
    assert out.returncode == 0 and "pulled tiny 2" in out.stderr and (tmp_path / "home/models/newest").is_dir()
    out = edgellm("pull", f"{fleet['url']}/main/bundles/tiny/1", *key, device_only=True)
    assert out.returncode == 2 and "--force" in out.stderr  # tiny is there already
    out = edgellm("pull", f"{fleet['url']}/tamper/bundles/tampered/1", *key, device_only=True)
    assert out.returncode != 0 and "sha256" in out.stderr and not (tmp_path / "home/models/tampered").exists()
    out = edgellm("pull", f"{fleet['url']}/other/bundles/rogue/1", *key, device_only=True)
    assert out.returncode != 0 and "key" in out.stderr and not (tmp_path / "home/models/rogue").exists()
    out = edgellm("pull", f"{fleet['url']}/main/bundles/tiny/2", "--name", "again", device_only=True)
    assert out.returncode == 2 and "--key" in out.stderr
    out = edgellm("pull", "some-org/some-model", device_only=True)  # a hub id is built on the host
    assert out.returncode == 2 and "central host" in out.stderr and "Traceback" not in out.stderr, out.stderr


# -- staged rollouts that stop themselves ---------------------------------------------------------------
def fleet_cli(broker: Broker, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, "fleet", *args, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port)]
                          if args[0] != "history" else [*EDGELLM, "fleet", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_rollout_plan_judges_by_failures_first_then_pending_devices_then_soak():
    from edgellm.models.errors import BuildError
    from edgellm.models.fleet.rollout import Counts, RolloutPlan, Verdict, judge

    plan = RolloutPlan((10, 50, 100), soak_seconds=60, abort_percent=20, abort_min_reports=5, stage_timeout=600)
    cases = [  # (stage, counts, seconds into the stage) -> verdict
        (0, Counts(in_stage=4, pending=4), 0, Verdict.WAIT),
        (0, Counts(in_stage=4, succeeded=2, rolled_back=2), 1, Verdict.WAIT),  # 50% bad, but only 4 finished
        (0, Counts(in_stage=6, succeeded=3, failed=1, rolled_back=1, pending=1), 1, Verdict.ABORT),  # 2 of 5
        (0, Counts(in_stage=6, succeeded=5, failed=1), 1, Verdict.WAIT),  # 1 of 6 bad (17%): soak first
        (0, Counts(in_stage=6, succeeded=5, failed=1), 61, Verdict.ADVANCE),
        (1, Counts(in_stage=9, succeeded=8, pending=1), 599, Verdict.WAIT),  # one device still updating
        (1, Counts(in_stage=9, succeeded=8, pending=1), 601, Verdict.ABORT),  # ... past the stage timeout
        (2, Counts(in_stage=20, succeeded=20), 60, Verdict.COMPLETE),
        (0, Counts(), 61, Verdict.ADVANCE),  # a stage that reaches no device advances after its soak
    ]
    for stage, counts, age, expected in cases:
        verdict, reason = judge(plan, stage, counts, age)
        assert verdict is expected, (stage, counts, age, verdict, reason)
    assert "2 of 5 finished updates failed or rolled back (40% >= 20%)" in judge(plan, *cases[2][:3])[1]
    for bad in [(50, 25, 100), (5, 25), (0, 100), (5, 5, 100)]:
        with pytest.raises(BuildError, match="--stages"):
            RolloutPlan(bad)


@pytest.mark.slow
def test_rollout_advances_by_stage_and_aborts_a_failing_release_back_to_the_previous(tmp_path, broker, fleet,
                                                                                     watch):
    """Real daemons, the real `fleet rollout`: a good release goes 34% -> 100% (one device, then all); a
    release that fails its smoke test aborts in its first stage, no device outside that stage receives it,
    and the group's previous desired state is published again. The history keeps both rollouts."""
    names = ["gw-a", "gw-b", "gw-c"]  # buckets 73.1, 77.1 and 27.9: 34% reaches gw-c alone
    assert [n for n in names if in_rollout(n, 34)] == ["gw-c"]
    history = tmp_path / "rollouts.sqlite"
    devices = [device(tmp_path, broker, fleet, n).start() for n in names]
    try:
        common = ["--group", "lab", "--stages", "34,100", "--soak", "1", "--history", str(history)]
        good = fleet_cli(broker, "rollout", "--store", str(fleet["main"]), "--url", f"{fleet['url']}/main",
                         "--name", "tiny", "--version", "2", *common)
        assert good.returncode == 0, good.stderr
        assert "completed" in good.stdout
        desired = DesiredState.model_validate_json(retained(broker.port, "edgellm/v1/groups/lab/desired"))
        assert (desired.version, desired.percent) == ("2", 100)
        reports = {n: watch.wait(n, desired.id, ("SUCCEEDED",)) for n in names}
        # gw-c (stage 1) finished before the others started: they waited for the stage to soak
        first_late = min(reports[n]["history"]["QUEUED"] for n in ("gw-a", "gw-b"))
        assert reports["gw-c"]["history"]["SUCCEEDED"] < first_late

        bad = fleet_cli(broker, "rollout", "--store", str(fleet["other"]), "--url", f"{fleet['url']}/other",
                        "--name", "bad-golden", "--version", "1", "--abort-min-reports", "1", *common)
        assert bad.returncode == 3, bad.stdout + bad.stderr
        assert "aborted in stage 1: 1 of 1 finished updates failed or rolled back (100% >= 10%)" in bad.stderr
        assert "tiny 2 published again" in bad.stderr
        restored = DesiredState.model_validate_json(retained(broker.port, "edgellm/v1/groups/lab/desired"))
        assert (restored.name, restored.version, restored.percent) == ("tiny", "2", 100)
        assert restored.id != desired.id
        for n in names:
            watch.wait(n, restored.id, ("SUCCEEDED",))
            assert serving(broker, n)["bundle"] == {"name": "tiny", "version": "2"}
        bad_ids = {r["desired_id"] for n in names for r in watch.reports[n] if r["name"] == "bad-golden"}
        assert len(bad_ids) == 1
        assert watch.states("gw-c", bad_ids.pop())[-1] == "ROLLED_BACK"
        assert all(r["name"] != "bad-golden" for n in ("gw-a", "gw-b") for r in watch.reports[n])

        status = fleet_cli(broker, "status", "--once", "--wait", "0", "--json")
        rollouts = json.loads(status.stdout)["rollouts"]
        assert [(r["group"], r["name"], r["state"], r["stage"]) for r in rollouts] == [
            ("lab", "bad-golden", "ABORTED", 0)]
        assert rollouts[0]["counts"]["rolled_back"] == 1
        table = fleet_cli(broker, "status", "--once", "--wait", "0")
        assert "bad-golden v1" in table.stdout and "ABORTED" in table.stdout
        events = json.loads(fleet_cli(broker, "history", "--history", str(history), "--json").stdout)
        assert [(e["name"], e["event"], e["percent"]) for e in events] == [
            ("tiny", "started", 34), ("tiny", "advanced", 100), ("tiny", "completed", 100),
            ("bad-golden", "started", 34), ("bad-golden", "aborted", 34)]
        assert events[2]["counts"]["succeeded"] == 3
        text = fleet_cli(broker, "history", "--history", str(history), "--group", "lab").stdout
        assert "bad-golden v1 aborted" in text and "1 of 1 finished updates failed" in text
    finally:
        for d in devices:
            d.stop()


@pytest.mark.slow
def test_rollout_refuses_bad_plans_before_publishing(tmp_path, broker, fleet):
    for args, message in [(["--stages", "50,25"], "--stages: 50,25 must rise and end at 100"),
                          (["--stages", "five"], "--stages: 'five' is not a list of percentages"),
                          (["--abort-percent", "0"], "--abort-percent: above 0"),
                          (["--soak", "60", "--stage-timeout", "30"], "--stage-timeout: above --soak")]:
        out = fleet_cli(broker, "rollout", "--store", str(fleet["main"]), "--group", "lab", *args, timeout=60)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    out = fleet_cli(broker, "history", "--history", str(tmp_path / "none.sqlite"), timeout=60)
    assert out.returncode == 2 and "does not exist yet" in out.stderr
    with pytest.raises(AssertionError, match="nothing retained"):
        retained(broker.port, "edgellm/v1/groups/lab/desired", timeout=1)


@pytest.mark.slow
def test_a_device_updates_from_nginx_and_resumes_with_its_range_responses(tmp_path, broker, fleet, watch):
    """Nothing depends on `bundle serve`: the store is plain files, here behind Debian's nginx."""
    nginx = Nginx(tmp_path, fleet["main"].parent).start()
    try:
        chunk, source, fetched, transferred = resume_largest_chunk(tmp_path, fleet, nginx.url, 1 / 3)
        assert fetched == source and transferred == len(source) - int(len(source) / 3)
        assert any(chunk["sha256"] in line and '" 206 ' in line for line in nginx.access_log())

        gateway = device(tmp_path, broker, fleet, "gw-nginx").start()
        try:
            published = publish(fleet, broker, "tiny", "1", "gw-nginx", server=nginx.url)
            report = watch.wait("gw-nginx", published, ("SUCCEEDED", "FAILED", "ROLLED_BACK"))
            assert report["state"] == "SUCCEEDED", report
            assert serving(broker, "gw-nginx")["bundle"] == {"name": "tiny", "version": "1"}
            assert report["bytes_transferred"] >= report["full_bytes"]
            whole = {line.split("/main/chunks/")[1].split()[0].split("/")[1] for line in nginx.access_log()
                     if "/main/chunks/" in line and '" 200 ' in line}
            assert whole == set(chunks_of(fleet["main"], "tiny", "1"))  # every chunk, whole
        finally:
            gateway.stop()
    finally:
        nginx.stop()
