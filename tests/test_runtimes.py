"""The runtime interface: the registry, ``--runtime auto`` chosen by measurement (checked with
a fake timing table), ONNX Runtime computing what torch computes, and the converted-model
caches verified by their digests."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from pipeline.data.dataset import DatasetPaths
from pipeline.engine import onnx_runtime, openvino_runtime, runtimes
from pipeline.engine.frozen import ModelFiles
from pipeline.engine.runtimes import Probe, choose_fastest, get_runtime, resolve_runtime
from pipeline.features import (
    ExtractionSettings,
    cached_features,
    cached_stage_maps,
    extract_features,
)
from pipeline.io import OptionError
from pipeline.models.stages import split_backbone
from tests.conftest import make_tiny_dataset

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def probe(backbone):
    return Probe(backbone.module, backbone.preprocessing, True, "fp32")


def test_an_unknown_runtime_is_refused_naming_the_valid_ones():
    assert list(runtimes.RUNTIMES) == ["torch", "openvino", "onnxruntime"]
    with pytest.raises(OptionError, match="--runtime 'onnx': valid values are auto, torch, openvino, onnxruntime"):
        get_runtime("onnx")
    with pytest.raises(OptionError, match="--runtime 'tensorrt': valid values are"):
        resolve_runtime("tensorrt", CPU)


def test_a_runtime_that_cannot_run_here_is_refused_with_the_reason(monkeypatch, probe):
    with pytest.raises(OptionError, match="--runtime openvino: openvino runs on a CPU; this run's device is cuda"):
        resolve_runtime("openvino", CUDA, probe)
    with pytest.raises(OptionError, match="--runtime torch cannot run precision int8"):
        resolve_runtime("torch", CPU, Probe(probe.module, probe.preprocessing, True, "int8"))
    monkeypatch.setattr(onnx_runtime, "onnxruntime_version", lambda: None)
    with pytest.raises(OptionError, match="the onnxruntime package is not installed"):
        resolve_runtime("onnxruntime", CPU, probe)
    assert resolve_runtime("torch", CPU, probe) == "torch"


def test_auto_is_torch_on_a_gpu_without_measuring(monkeypatch, probe):
    monkeypatch.setattr(runtimes, "measure_runtime", lambda *args: pytest.fail("measured"))
    assert resolve_runtime("auto", CUDA, probe) == "torch"


def test_auto_chooses_the_fastest_by_the_timing_table_and_keeps_the_measurement(monkeypatch, probe, tmp_path):
    table = {"torch": 40.0, "openvino": 62.3, "onnxruntime": 100.4}
    measured: list[str] = []
    monkeypatch.setattr(runtimes, "measure_runtime", lambda name, *args: measured.append(name) or table[name])
    assert resolve_runtime("auto", CPU, probe, tmp_path) == "onnxruntime"
    assert measured == ["torch", "openvino", "onnxruntime"]
    (entry,) = json.loads((tmp_path / "runtime_choice.json").read_text()).values()
    assert entry["chosen"] == "onnxruntime" and entry["images_per_second"] == table
    assert entry["key"]["resolution"] == 32 and entry["key"]["precision"] == "fp32"
    assert {"cpu", "instruction_set", "versions"} <= set(entry["key"])

    # The same machine and model: read, not measured again (even if the table changed).
    table["torch"] = 1000.0
    assert resolve_runtime("auto", CPU, probe, tmp_path) == "onnxruntime" and len(measured) == 3
    # Another resolution is another key: measured, and here torch is now the fastest.
    other = Probe(probe.module, {**probe.preprocessing, "resolution": 64}, True, "fp32")
    assert resolve_runtime("auto", CPU, other, tmp_path) == "torch" and len(measured) == 6
    # Another CPU (instruction set) is another key too.
    monkeypatch.setattr(runtimes, "instruction_set", lambda: "amx")
    table["openvino"] = 5000.0
    assert resolve_runtime("auto", CPU, probe, tmp_path) == "openvino"
    # torch runs no int8: the others are measured.
    measured.clear()
    int8 = Probe(probe.module, probe.preprocessing, False, "int8")
    assert resolve_runtime("auto", CPU, int8, tmp_path) == "openvino" and measured == ["openvino", "onnxruntime"]
    # Where only one runtime runs the precision, it is chosen without a measurement.
    measured.clear()
    monkeypatch.setattr(openvino_runtime, "openvino_version", lambda: None)
    assert resolve_runtime("auto", CPU, int8, tmp_path) == "onnxruntime" and measured == []


def test_a_runtime_that_fails_to_run_is_not_chosen(caplog, tmp_path):
    def measure(name: str) -> float:
        if name == "openvino":
            raise RuntimeError("unsupported operation")
        return {"torch": 10.0, "onnxruntime": 5.0}[name]

    caplog.set_level(logging.WARNING)
    assert choose_fastest(["torch", "openvino", "onnxruntime"], measure, tmp_path / "c.json", {"k": 1}) == "torch"
    assert "openvino could not run this model (RuntimeError: unsupported operation)" in caplog.text
    with pytest.raises(OptionError, match="none of openvino could run this model"):
        choose_fastest(["openvino"], measure, None, {"k": 2})


def test_an_unreadable_choice_file_is_measured_again(monkeypatch, probe, tmp_path, caplog):
    (tmp_path / "runtime_choice.json").write_text("{cut off")
    monkeypatch.setattr(runtimes, "measure_runtime", lambda name, *args: {"torch": 3.0}.get(name, 1.0))
    assert resolve_runtime("auto", CPU, probe, tmp_path) == "torch"
    assert "runtime_choice.json: unreadable" in caplog.text


@pytest.mark.timed_runtimes
def test_auto_measures_every_runtime_here(probe, tmp_path):
    chosen = resolve_runtime("auto", CPU, probe, tmp_path)
    (entry,) = json.loads((tmp_path / "runtime_choice.json").read_text()).values()
    assert set(entry["images_per_second"]) == set(runtimes.available_runtimes(CPU, "fp32"))
    assert all(rate > 0 for rate in entry["images_per_second"].values())
    assert chosen == max(entry["images_per_second"], key=entry["images_per_second"].get)


def test_onnxruntime_features_and_stage_maps_match_torch(backbone, tmp_path):
    root = make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0)
    paths, ids = DatasetPaths.resolve(root), [f"{i}.jpg" for i in range(6)]
    (paths.images / ids[1]).write_bytes(b"not a jpeg")  # unreadable: NaN, and never run
    by_runtime = {runtime: extract_features(backbone, paths, ids, CPU, batch_size=4, workers=0, runtime=runtime,
                                            model_cache=tmp_path / runtime)
                  for runtime in ("torch", "onnxruntime")}
    (torch_features, torch_ok), (ort_features, ort_ok) = by_runtime.values()
    assert torch.equal(torch_ok, ort_ok) and ort_ok.tolist() == [True, False, True, True, True, True]
    assert ort_features[1].isnan().all()
    assert torch.allclose(ort_features[ort_ok].float(), torch_features[ort_ok].float(), rtol=2e-3, atol=2e-3)
    assert len(list((tmp_path / "onnxruntime" / "onnxruntime").glob("*.onnx"))) == 1

    front, _ = split_backbone(backbone, 2)
    maps = {runtime: cached_stage_maps(backbone, front, 2, paths, ids, ExtractionSettings(
                cache_dir=tmp_path / f"maps-{runtime}", device=CPU, batch_size=4, workers=0, runtime=runtime))
            for runtime in ("torch", "onnxruntime")}
    plain = {runtime: torch.from_numpy(m.read("plain", list(range(len(ids))))).float() for runtime, m in maps.items()}
    assert plain["onnxruntime"].shape == plain["torch"].shape and plain["onnxruntime"][1].isnan().all()
    assert torch.allclose(plain["onnxruntime"][ort_ok], plain["torch"][ort_ok], rtol=2e-3, atol=2e-3)
    for runtime in ("onnxruntime", "torch"):
        cached_features(backbone, paths, ids, ExtractionSettings(cache_dir=tmp_path / "keys", device=CPU, batch_size=4,
                                                                 workers=0, runtime=runtime))
    assert len(list((tmp_path / "keys").glob("features-*"))) == 2


def test_onnxruntime_uses_as_many_threads_as_torch(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "_SESSIONS", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    forward = onnx_runtime.OnnxRuntime().build(backbone.module, backbone.preprocessing, True, "fp32", CPU,
                                                None, 1)
    assert forward.session.get_session_options().intra_op_num_threads == 3


def test_onnxruntime_runs_in_the_loader_workers_and_a_spawned_worker_gets_the_model(backbone, tmp_path,
                                                                                   monkeypatch):
    root = make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0)
    paths, ids = DatasetPaths.resolve(root), [f"{i}.jpg" for i in range(6)]
    in_main = extract_features(backbone, paths, ids, CPU, batch_size=2, workers=0, runtime="onnxruntime",
                               model_cache=tmp_path / "models")
    monkeypatch.setattr(onnx_runtime, "_SESSIONS", {})
    in_workers = extract_features(backbone, paths, ids, CPU, batch_size=2, workers=2, runtime="onnxruntime",
                                  model_cache=tmp_path / "models")
    # Each worker opened its own session: this process opened none.
    (forward,) = onnx_runtime._SESSIONS.values()
    assert forward._sessions == {}
    # One thread or several, the same model up to float16 rounding of the cache.
    assert torch.allclose(in_workers[0].float(), in_main[0].float(), rtol=1e-3, atol=1e-3)
    assert torch.equal(in_workers[1], in_main[1])

    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    spawned = pickle.loads(pickle.dumps(forward))
    assert torch.equal(spawned(pixels), forward(pixels))


# --- the converted-model caches: a digest beside the files, verified when loaded ---------------

def _zero_middle_third(path):
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = bytes(third)
    path.write_bytes(bytes(data))




def _build(runtime_name: str, backbone, cache, monkeypatch):
    monkeypatch.setattr(openvino_runtime, "_COMPILED", {})
    monkeypatch.setattr(onnx_runtime, "_SESSIONS", {})
    return get_runtime(runtime_name).build(backbone.module, backbone.preprocessing, True, "fp32", CPU, cache, 1)


@pytest.mark.parametrize("damage", ["truncated xml", "truncated bin", "missing bin", "zeroed middle of bin",
                                    "missing digest", "unreadable digest"])
def test_a_damaged_openvino_model_is_rebuilt_with_a_warning_naming_the_file(backbone, tmp_path, monkeypatch,
                                                                             caplog, damage):
    pytest.importorskip("openvino")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = _build("openvino", backbone, tmp_path, monkeypatch)(pixels)
    (xml,) = (tmp_path / "openvino").glob("*.xml")
    files = ModelFiles(xml, (".bin",))
    binary = xml.with_suffix(".bin")
    at_fault = {"truncated xml": xml, "truncated bin": binary, "missing bin": binary,
                "zeroed middle of bin": binary, "missing digest": files.digest_file,
                "unreadable digest": files.digest_file}[damage]
    if damage.startswith("truncated"):
        at_fault.write_bytes(at_fault.read_bytes()[: at_fault.stat().st_size // 2])
    elif damage == "missing bin":
        binary.unlink()
    elif damage == "zeroed middle of bin":
        size = binary.stat().st_size
        _zero_middle_third(binary)
        assert binary.stat().st_size == size
    elif damage == "missing digest":
        files.digest_file.unlink()
    else:
        files.digest_file.write_text("{not json")
    caplog.set_level(logging.WARNING)
    rebuilt = _build("openvino", backbone, tmp_path, monkeypatch)
    assert f"model cache: {at_fault}" in caplog.text and "converting the model again" in caplog.text
    assert torch.equal(rebuilt(pixels), expected)
    assert files.problem() is None  # rewritten with its digest
    caplog.clear()
    _build("openvino", backbone, tmp_path, monkeypatch)
    assert caplog.text == ""  # and read as it is the next time


@pytest.mark.parametrize("damage", ["truncated", "zeroed middle third", "missing digest", "not a model"])
def test_a_damaged_onnx_model_is_rebuilt_with_a_warning_naming_the_file(backbone, tmp_path, monkeypatch, caplog,
                                                                         damage):
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = _build("onnxruntime", backbone, tmp_path, monkeypatch)(pixels)
    (model,) = (tmp_path / "onnxruntime").glob("*.onnx")
    files = ModelFiles(model)
    at_fault = model
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "zeroed middle third":
        _zero_middle_third(model)
    elif damage == "missing digest":
        files.digest_file.unlink()
        at_fault = files.digest_file
    else:
        # Garbage recorded with a matching digest, as a foreign tool might leave: unreadable, so rebuilt.
        model.write_bytes(b"not an onnx model")
        files.write(lambda path: path.write_bytes(b"not an onnx model"))
    caplog.set_level(logging.WARNING)
    rebuilt = _build("onnxruntime", backbone, tmp_path, monkeypatch)
    assert f"model cache: {at_fault}" in caplog.text and "converting the model again" in caplog.text
    assert torch.equal(rebuilt(pixels), expected)
    assert files.problem() is None


def test_the_options_choices_are_the_registry():
    """The parsers list the runtimes without importing them (a fast --help): the same names."""
    from pipeline.choices import RUNTIMES as OPTION_CHOICES
    from pipeline.engine.runtimes import RUNTIME_CHOICES

    assert OPTION_CHOICES == RUNTIME_CHOICES
    # Each runtime is registered under the name it calls itself (its cache keys and records).
    assert {name: runtime.name for name, runtime in runtimes.RUNTIMES.items()} == {
        "torch": "torch", "openvino": "openvino", "onnxruntime": "onnxruntime"}
