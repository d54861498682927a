"""Run-time LoRA adapters: one base built with adapter slots, peft adapters chosen per request, batched
together; each must compute what its merged model computes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError
from tests.conftest import build

pytestmark = pytest.mark.slow  # see the README's development section

WORDS = ["invoice", "factura", "facture", "contract"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_sources):
    """Two q/v adapters trained on a tiny Llama (one echoes words, one answers in capitals), one on o, the
    base built fp32 with q/v slots and both q/v adapters inside, and the merged models to compare with."""
    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec
    from edgellm.models.tuning.lora import LoraOptions, merge_lora, train_lora

    root, base = tmp_path_factory.mktemp("adapters"), tiny_sources["llama"]
    made = {}
    for name, modules, answer in [("echo", ["q_proj", "v_proj"], str), ("shout", ["q_proj", "v_proj"], str.upper),
                                  ("out", ["o_proj"], str)]:
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": answer(w)}) + "\n"
                                for w in WORDS * 4))
        made[name] = root / name
        train_lora(str(base), data, made[name], LoraOptions(epochs=4, batch_size=4, learning_rate=0.05,
                                                             target_modules=modules, show_progress=False))
    for name in ("echo", "shout"):
        merge_lora(str(base), made[name], root / f"merged-{name}")
        build(root / f"merged-{name}", root / f"merged-{name}-fp32", "fp32")
    slots = root / "slots"
    build_model(str(base), slots, BuildOptions(QuantSpec("fp32"), show_progress=False,
                                               adapter_slots=("q_proj", "v_proj"),
                                               adapters={"echo": made["echo"], "shout": made["shout"]}))
    return {"root": root, "base": base, "slots": slots, "plain": build(base, root / "plain-fp32", "fp32"), **made}


def logits(model: LoadedModel, text: str, adapter: str | None = None) -> np.ndarray:
    d = model.decoder
    return d.forward(model.encode(text), d.new_cache(), all_logits=True,
                     adapter=d.adapters.get(adapter) if adapter else None)


def test_an_adapter_beside_the_base_computes_what_its_merge_computes(adapters):
    model = LoadedModel.load(adapters["slots"], threads=1)
    assert sorted(model.decoder.adapters.adapters) == ["echo", "shout"]  # loaded from the model's adapters/
    text = "Say invoice. The invoice total is 1,234.56 EUR."
    for name in ("echo", "shout"):
        merged = LoadedModel.load(adapters["root"] / f"merged-{name}-fp32", threads=1)
        assert np.abs(logits(model, text, name) - logits(merged, text)).max() < 1e-4
    plain = LoadedModel.load(adapters["plain"], threads=1)
    assert np.abs(logits(model, text) - logits(plain, text)).max() < 1e-4  # no adapter: the base, exactly
    assert np.abs(logits(model, text, "echo") - logits(model, text, "shout")).max() > 1e-2


def test_requests_for_different_adapters_share_batched_steps_and_get_their_own_answers(adapters):
    model = LoadedModel.load(adapters["slots"], threads=1)
    alone = Generator(model)
    batched = Generator(model, batch_rows=4)
    requests = [(w, a) for w in ("invoice", "facture") for a in ("echo", "shout", None)]
    expected = {}
    for word, adapter in requests:
        params = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True, adapter=adapter)
        expected[word, adapter] = alone.generate(alone.prompt_ids(f"Say {word}."), params).text
    assert len(set(expected.values())) > 2, expected  # the adapters do change the answers
    got: dict = {}
    together = threading.Barrier(len(requests))  # all submitted at once: on a busy machine a thread started
    # late could find the others finished, and the step would not be shared

    def run(word: str, adapter: str | None) -> None:
        params = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True, adapter=adapter)
        ids = batched.prompt_ids(f"Say {word}.")
        together.wait(60)
        got[word, adapter] = batched.generate(ids, params).text

    threads = [threading.Thread(target=run, args=r) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert max(batched.scheduler.steps) > 1  # rows with different adapters ran in the same steps


def test_unknown_adapters_and_mismatched_ones_are_refused_with_the_fix(adapters, tmp_path):
    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec
    from edgellm.models.errors import BuildError

    model = LoadedModel.load(adapters["slots"], threads=1)
    g = Generator(model)
    with pytest.raises(EdgeError, match="adapter: 'nope' is not loaded on this model; loaded: echo, shout") as e:
        g.generate(g.prompt_ids("Say invoice."), GenerationParams(max_tokens=2, adapter="nope"))
    assert e.value.code == "bad_request" and e.value.param == "adapter"
    plain = Generator(LoadedModel.load(adapters["plain"], threads=1))
    with pytest.raises(EdgeError, match="takes no run-time adapters; build it with `--adapter-slots`"):
        plain.generate(plain.prompt_ids("Say invoice."), GenerationParams(max_tokens=2, adapter="echo"))
    # q/v slots sit on the packed q/k/v projection, so a k_proj adapter would fit; o_proj has no slot
    with pytest.raises(EdgeError, match=r"adapts model.layers.0.self_attn.o_proj, .* takes adapters on k_proj, "
                                        r"q_proj, v_proj only; rebuild it with `--adapter-slots`"):
        model.decoder.adapters.load("out", adapters["out"])
    with pytest.raises(BuildError, match="--adapter: give --adapter-slots too"):
        build_model(str(adapters["base"]), tmp_path / "x", BuildOptions(QuantSpec("fp32"), show_progress=False,
                                                                        adapters={"echo": adapters["echo"]}))
    with pytest.raises(EdgeError, match="takes adapters on k_proj, q_proj, v_proj only"):
        build_model(str(adapters["base"]), tmp_path / "y", BuildOptions(
            QuantSpec("fp32"), show_progress=False, adapter_slots=("q_proj", "v_proj"),
            adapters={"out": adapters["out"]}))
    assert not (tmp_path / "y").exists()


def test_the_daemon_serves_adapters_by_name_over_http_mqtt_and_the_cli(adapters, tmp_path):
    """vLLM's way over HTTP (the adapter is a model in /v1/models), an `adapter` field over MQTT, `--adapter`
    on the command line: each gives the answer the library gives."""
    import subprocess

    import openai

    from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess, free_port, rpc, wait_for_port

    model = LoadedModel.load(adapters["slots"], threads=1)
    g = Generator(model)
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    expected = {a: g.generate(g.prompt_ids("Say facture.", raw=True), GenerationParams(**params, adapter=a)).text
                for a in ("shout", None)}
    broker = Broker(tmp_path).start()
    port = free_port()
    daemon = DaemonProcess(tmp_path, broker.port, adapters["slots"], device="lora1", env={
        "EDGELLM_HTTP__ENABLED": "true", "EDGELLM_HTTP__PORT": str(port)}).start()
    try:
        wait_for_port(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        listed = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
        base = next(name for name, parent in listed.items() if parent is None)
        assert listed == {base: None, "echo": base, "shout": base}
        for name, adapter in ((base, None), ("shout", "shout")):
            reply = client.completions.create(model=name, prompt="Say facture.", max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert reply.choices[0].text == expected[adapter] and reply.model == name
        with pytest.raises(openai.NotFoundError, match="'echo', 'shout'"):
            client.completions.create(model="whisper", prompt="Say facture.", max_tokens=2)
        with rpc(broker.port) as mqtt:
            reply = mqtt.call("edgellm/v1/lora1/rpc/generate", {"prompt": "Say facture.", "raw": True,
                                                                 "adapter": "shout", **params}, timeout=60)
            assert reply["ok"] and reply["text"] == expected["shout"], reply
            reply = mqtt.call("edgellm/v1/lora1/rpc/generate", {"prompt": "Say facture.", "adapter": "nope"},
                              timeout=60)
            assert not reply["ok"] and reply["error"]["code"] == "bad_request"
            assert "'nope' is not loaded on this model; loaded: echo, shout" in reply["error"]["message"]
    finally:
        daemon.stop()
        broker.stop()
    out = subprocess.run([*EDGELLM, "generate", "--model", str(adapters["slots"]), "--adapter", "shout", "--raw",
                          "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "Say facture."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.rstrip("\n") == expected["shout"].rstrip("\n"), out.stderr


def test_a_bundle_carries_its_adapters_and_a_new_adapter_ships_alone(adapters, tmp_path):
    """The same base with another adapter under the same name: the update is that adapter's file and the
    model's manifest, and the assembled slot serves it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from edgellm.daemon.update.bundle import BundleManifest, bundle_path, chunk_path
    from edgellm.daemon.update.slots import ActiveState, SlotStore
    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle, keygen

    again = tmp_path / "echo-again"  # echo retrained: every value new (scaled here), same shapes
    again.mkdir()
    shutil.copyfile(adapters["echo"] / "adapter_config.json", again / "adapter_config.json")
    save_file({k: v * 1.5 for k, v in load_file(str(adapters["echo"] / "adapter_model.safetensors")).items()},
              str(again / "adapter_model.safetensors"))
    retuned = tmp_path / "retuned"
    build_model(str(adapters["base"]), retuned, BuildOptions(QuantSpec("fp32"), show_progress=False,
                                                             adapter_slots=("q_proj", "v_proj"),
                                                             adapters={"echo": again, "shout": adapters["shout"]}))
    store, key = tmp_path / "store", tmp_path / "release.key"
    keygen(key)
    v1 = build_bundle(adapters["slots"], store, key, BundleOptions(name="slots", version="1"))
    v2 = build_bundle(retuned, store, key, BundleOptions(name="slots", version="2"))
    assert "adapters/echo/adapter_model.safetensors" in {f.path for f in v1.files}
    held = v1.unique_chunks()
    changed = {f.path for f in v2.files for c in f.chunks if c.sha256 not in held}
    assert changed == {"adapters/echo/adapter_model.safetensors", "manifest.json"}, changed
    adapter_bytes = next(f.size for f in v2.files if f.path == "adapters/echo/adapter_model.safetensors")
    assert sum(size for sha, size in v2.unique_chunks().items() if sha not in held) < 2 * adapter_bytes

    device = SlotStore(tmp_path / "device")
    for version, manifest in (("1", v1), ("2", v2)):
        for sha in device.missing_chunks(manifest):  # what the agent would fetch
            shutil.copyfile(store / chunk_path(sha), device.downloads / sha)
        body = (store / bundle_path("slots", version)).read_bytes()
        slot = device.assemble(BundleManifest.model_validate_json(body), body,
                               (store / bundle_path("slots", version, "bundle.json.sig")).read_bytes())
        device.set_state(ActiveState(active=slot.name, previous=device.state().active))
    served = LoadedModel.load(slot, threads=1, verify_hashes=True)
    assert sorted(served.decoder.adapters.adapters) == ["echo", "shout"]
    first = LoadedModel.load(adapters["slots"], threads=1)
    text = "Say facture."
    assert np.abs(logits(served, text, "shout") - logits(first, text, "shout")).max() < 1e-5
    assert np.abs(logits(served, text, "echo") - logits(first, text, "echo")).max() > 1e-3  # the new echo
