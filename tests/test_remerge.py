"""Re-merged updates: a LoRA merged into a 4-bit GGUF base is built so that a device holding the base computes
the tuned weights from the LoRA's factors (edgellm/daemon/update/remerge.py) instead of fetching them. Real
parts: a Q4_1 GGUF, `model build`, signed bundles, `bundle serve`, mosquitto and device daemons."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from edgellm.daemon.update.bundle import BundleManifest
from edgellm.daemon.update.remerge import merge_and_round, unpack
from tests.gguf_files import write_gguf
from tests.harness import EDGELLM, ROOT, free_port, wait_for_port
from tests.test_fleet import device, publish
from tests.test_gguf_build import engine_logits
from tests.test_keep_base import build, fake_merge

pytestmark = pytest.mark.slow  # see the README's development section

SIGNED = ("bundle.json", "bundle.json.sig")


@pytest.fixture(scope="module")
def remerged(tmp_path_factory, tiny_wide_llama):
    """v1: a small Llama (rows of 256, so every tensor gets chunks of its own) as a Q4_1 GGUF, built int4;
    v2: a rank-2 LoRA merge of it, built int4 (re-merged); `main` serves both; `bad` the same, with v2's
    recipe re-signed with its rows shifted by one."""
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle, keygen, load_private_key, sign

    root = tmp_path_factory.mktemp("remerge")
    gguf, reference = write_gguf(tiny_wide_llama, root / "base.gguf", {}, default="Q4_1")
    fake_merge(gguf, reference, root / "merged")
    for name, source, flags in [("v1", gguf, []), ("v2", root / "merged", []),
                                ("fp32", root / "merged", ["--quant", "fp32"])]:
        done = build(source, root / name, *flags)
        assert done.returncode == 0, done.stderr
    key = root / "signing.key"
    keygen(key)
    stores = root / "stores"
    for store in ("main", "bad"):
        build_bundle(root / "v1", stores / store, key, BundleOptions(name="tiny", version="1"))
        build_bundle(root / "v2", stores / store, key, BundleOptions(name="tiny", version="2"))
    bad = json.loads((stores / "bad/bundles/tiny/2/bundle.json").read_text())
    for weight in bad["remerge"]["weights"]:
        weight["changes"][0]["start"] += 1 if weight["changes"][0]["start"] == 0 else -1
    body = json.dumps(bad).encode()
    (stores / "bad/bundles/tiny/2/bundle.json").write_bytes(body)
    (stores / "bad/bundles/tiny/2/bundle.json.sig").write_bytes(sign(body, load_private_key(key)))
    port = free_port()
    server = subprocess.Popen([*EDGELLM, "bundle", "serve", "--store", str(stores), "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield {"root": root, "v1": root / "v1", "v2": root / "v2", "url": f"http://127.0.0.1:{port}",
           "main": stores / "main", "bad": stores / "bad", "public": root / "signing.key.pub"}
    server.terminate()
    server.wait(10)


def manifest(store, version: str) -> BundleManifest:
    return BundleManifest.model_validate_json((store / f"bundles/tiny/{version}/bundle.json").read_bytes())


def computed_chunks(m: BundleManifest) -> set[str]:
    """The chunks of v2 that lie inside a re-merged weight's bytes: what a device holding v1 computes."""
    places = {}
    for f in m.files:
        offset = 0
        for c in f.chunks:
            places.setdefault(f.path, []).append((offset, c))
            offset += c.size
    found = set()
    for w in m.remerge.weights:
        sizes = {"q": w.rows * w.cols // 2, "scales": w.rows * w.cols // w.block * 4,
                 "offsets": w.rows * w.cols // w.block * 4}
        found |= {c.sha256 for role, start in w.at.items() for offset, c in places[w.file]
                  if start <= offset and offset + c.size <= start + sizes[role]}
    return found


def expected_bytes(store, computed: set[str]) -> int:
    """What a device holding v1 fetches for v2: each missing chunk not computed, as its delta where there is one,
    and the signed manifest."""
    old, new = manifest(store, "1"), manifest(store, "2")
    have = old.unique_chunks()
    deltas = new.deltas()
    fetched = sum(deltas[sha].size if sha in deltas else size
                  for sha, size in new.unique_chunks().items() if sha not in have and sha not in computed)
    return fetched + sum(len((store / f"bundles/tiny/2/{f}").read_bytes()) for f in SIGNED)


def test_merge_and_round_is_the_round_to_nearest_of_the_merged_weight():
    from edgellm.models.building.fused_graph import quantize_blocks

    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (64, 4, 32)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.02, (64, 4)).astype(np.float32)
    offsets = rng.uniform(-0.1, 0.1, (64, 4)).astype(np.float32)
    up = (rng.standard_normal((64, 2)) * 0.05).astype(np.float16)
    down = (rng.standard_normal((2, 128)) * 0.05).astype(np.float16)
    new_q, new_scales = merge_and_round(q, scales, offsets, up, down)
    merged = (scales[..., None] * (q - 8.0) + offsets[..., None]).reshape(64, 128) + up.astype(float) @ down
    reference = quantize_blocks(merged.astype(np.float32), 4, 32, True)  # onnxruntime's quantizer
    assert np.allclose(new_scales, reference.scales, rtol=1e-5)
    assert (new_q == reference.q).mean() > 0.99  # ties and the last float bit aside, the same rounding
    again = merge_and_round(q, scales, offsets, up, down)
    assert np.array_equal(again[0], new_q) and np.array_equal(again[1], new_scales)
    assert np.array_equal(unpack(new_q[..., 0::2] | (new_q[..., 1::2] << 4)), new_q)


def test_a_merged_build_ships_a_recipe_the_host_ran_and_keeps_its_accuracy(remerged, tmp_path):
    m = manifest(remerged["main"], "2")
    method = json.loads((remerged["v2"] / "manifest.json").read_text())["quantization"]["method"]
    assert "remerge" in method and m.remerge is not None and "remerge.safetensors" in {f.path for f in m.files}
    old = manifest(remerged["main"], "1").unique_chunks()
    changed = {sha: size for sha, size in m.unique_chunks().items() if sha not in old}
    computed = computed_chunks(m)
    assert computed <= set(changed)
    assert sum(changed[s] for s in computed) > 0.5 * sum(changed.values())  # most of the update is computed
    # as accurate as rounding the merge's own float weights (the build without the LoRA's rank in its lineage)
    shutil.copytree(remerged["root"] / "merged", tmp_path / "merged")
    lineage = tmp_path / "merged" / "edgellm-lineage.json"
    lineage.write_text(json.dumps({k: v for k, v in json.loads(lineage.read_text()).items() if k != "training"}))
    done = build(tmp_path / "merged", tmp_path / "float-rounded")
    assert done.returncode == 0, done.stderr
    assert "remerge" not in json.loads((tmp_path / "float-rounded/manifest.json").read_text())["quantization"]["method"]
    want = engine_logits(remerged["root"] / "fp32")
    error = {name: max(np.abs(g - w).max() for g, w in zip(engine_logits(folder), want, strict=True))
             for name, folder in {"remerged": remerged["v2"], "float": tmp_path / "float-rounded"}.items()}
    assert error["remerged"] < 1.25 * error["float"], error


@pytest.mark.parametrize("store", ["main", "bad"])
def test_a_device_computes_the_tuned_weights_or_fetches_them(store, tmp_path, broker, watch, remerged):
    """`main`: the device fetches the factors and computes the weights. `bad` (a recipe that does not give the
    signed bytes): every computed chunk fails its sha256, so it fetches them, and the update still succeeds."""
    d = device(tmp_path, broker, remerged, "gw-r").start()
    try:
        first = publish(remerged, broker, "tiny", "1", "groups/lab", 100, store)
        assert watch.wait("gw-r", first, ("SUCCEEDED", "FAILED", "ROLLED_BACK"))["state"] == "SUCCEEDED"
        second = publish(remerged, broker, "tiny", "2", "groups/lab", 100, store)
        report = watch.wait("gw-r", second, ("SUCCEEDED", "FAILED", "ROLLED_BACK"))
        assert report["state"] == "SUCCEEDED", report
        computed = computed_chunks(manifest(remerged[store], "2")) if store == "main" else set()
        assert report["bytes_transferred"] == expected_bytes(remerged[store], computed)
        slot = tmp_path / "state-gw-r" / "slots" / "tiny-2"
        for name in ("model.onnx.data", "remerge.safetensors"):
            assert hashlib.sha256((slot / name).read_bytes()).digest() == \
                hashlib.sha256((remerged["v2"] / name).read_bytes()).digest()
    finally:
        d.stop()
