"""nodes/recording.py with the ComfyUI doubles: sampling a recording clone records under the names the
convert node gives the weights; the input MODEL is never recorded; memory is capped, reported and freed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from quant_core.calibration import RecordedStatistics, Recorder

WEIGHTS = {"blocks.0.attn.q.weight", "blocks.0.mlp.fc.weight", "blocks.1.attn.q.weight", "blocks.1.mlp.fc.weight"}


def _forward(diffusion_model, x: torch.Tensor) -> torch.Tensor:
    """The tiny model's "diffusion model": attention-ish residuals and an MLP per block."""
    h = x.to(torch.bfloat16)
    for block in diffusion_model.blocks:
        h = h + block.attn.q(block.norm(h))
        block.mlp.fc(h)
    if hasattr(diffusion_model, "final_layer"):
        h = diffusion_model.final_layer(h)
    return h.float()


def _sample(comfy, patcher, steps: int = 3, seed: int = 0, batch: int = 2) -> None:
    """A few sampling steps as ComfyUI makes them: through ``BaseModel.apply_model`` and its wrappers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for step in range(steps):
            x = torch.randn(batch, 5, 32, generator=generator)
            comfy.apply_model(patcher, _forward, x, torch.full((batch,), 1.0 - step / steps))


def _hooks(patcher) -> int:
    return sum(len(m._forward_hooks) for m in patcher.model.modules())


def test_recorded_names_are_the_convert_nodes_weight_names(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    clone, session = pack.recording.record_model(patcher, 64, node_id="3")
    _sample(comfy, clone)
    report = pack.recording.save_recording(session, "flux/run")
    assert report.path == str(comfy.models / "fp8_calibration" / "flux" / "run_00001_.safetensors")
    with RecordedStatistics(report.path) as statistics:
        assert statistics.names == WEIGHTS
        names = set(pack.model_source.ModelSource(patcher, torch.device("cpu")).tensors)
        assert statistics.names <= names  # the keys the convert node reads
    assert (report.layers, report.calls, report.rows) == (4, 3, 6)
    assert "flux/run_00001_.safetensors" in pack.host.calibration_files()  # the convert nodes list it


def test_by_default_only_layers_the_converter_quantizes_are_recorded(pack, comfy, tiny_model):
    model = tiny_model(blocks=1)
    model.diffusion_model.final_layer = torch.nn.Linear(32, 32).to(torch.bfloat16)  # every preset keeps it
    patcher = comfy.ModelPatcher(model)
    recorded = {}
    for all_layers in (False, True):
        clone, session = pack.recording.record_model(patcher, 64, all_layers=all_layers)
        _sample(comfy, clone, steps=1)
        with RecordedStatistics(pack.recording.save_recording(session, "layers").path) as statistics:
            recorded[all_layers] = statistics.names
    assert recorded[False] == {"blocks.0.attn.q.weight", "blocks.0.mlp.fc.weight"}
    assert recorded[True] == recorded[False] | {"final_layer.weight"}


def test_only_the_recording_clone_is_recorded(pack, comfy, tiny_model, tmp_path):
    """Sampling the input MODEL between the clone's runs changes nothing in the file; no hook stays behind."""
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    alone, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, alone, seed=1)
    assert _hooks(patcher) == 0
    session.save(tmp_path / "alone.safetensors")

    mixed, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, patcher, seed=7)  # the input MODEL, before and after the clone
    _sample(comfy, mixed, seed=1)
    _sample(comfy, patcher, seed=8)
    assert _hooks(patcher) == 0
    report = session.save(tmp_path / "mixed.safetensors")
    assert report.calls == 3
    assert (tmp_path / "mixed.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()


def test_model_calls_from_several_threads_are_all_recorded(pack, comfy, tiny_model, tmp_path):
    """ComfyUI's multi-GPU sampling runs a step's batches in threads, each on its own copy of the model."""
    clone, session = pack.recording.record_model(comfy.ModelPatcher(tiny_model(blocks=2)), 64)
    copies = [clone.clone(), clone.clone()]
    copies[1].model = tiny_model(blocks=2)  # the second "GPU": another module tree, same paths
    threads = [threading.Thread(target=_sample, args=(comfy, copy, 5, seed)) for seed, copy in enumerate(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = session.save(tmp_path / "threads.safetensors")
    assert (report.calls, report.rows, report.layers) == (10, 20, 4)
    with RecordedStatistics(report.path) as statistics:
        for name in WEIGHTS:  # 10 calls of 2 x 5 rows each, none lost
            stats = statistics.get(name)
            assert stats.count + stats.count_heldout == 100


def test_hooks_are_removed_when_sampling_is_interrupted(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    clone, session = pack.recording.record_model(patcher, 64)

    def cancelled(diffusion_model, x):
        _forward(diffusion_model, x)
        raise comfy.InterruptProcessingException()

    with pytest.raises(comfy.InterruptProcessingException):
        comfy.apply_model(clone, cancelled, torch.randn(1, 4, 32), torch.ones(1))
    assert _hooks(patcher) == 0 and session.calls == 0


def test_memory_is_capped_reported_and_freed_on_save(pack, comfy, tiny_model, tmp_path):
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    session = pack.recording.RecordingSession(max_bytes=1, node_id="4")
    clone = pack.host.wrap_apply_model(patcher, pack.recording.WRAPPER_KEY, session)
    _sample(comfy, clone, steps=2)
    held = session.nbytes
    assert held > 0
    status = comfy.server.messages[-1]
    assert status[0] == "progress_text" and status[1]["node"] == "4" and status[2] == "client-1"
    assert "2 model calls, 1 layers" in status[1]["text"]
    report = session.save(tmp_path / "capped.safetensors")
    assert report.layers == 1 and report.nbytes == held  # the first layer the forward pass reached
    assert report.over_cap == ["blocks.0.mlp.fc", "blocks.1.attn.q", "blocks.1.mlp.fc"]
    assert "3 layers over the memory cap" in report.text() and f"{held / 2**20:.1f} MiB" in report.text()
    assert session.nbytes == 0 and session.recorder is None  # freed
    with RecordedStatistics(tmp_path / "capped.safetensors") as statistics:
        assert statistics.names == {"blocks.0.attn.q.weight"}


def test_a_save_starts_a_new_recording(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    clone, session = pack.recording.record_model(patcher, 64)
    with pytest.raises(pack.host.UserError, match="nothing was recorded"):
        pack.recording.save_recording(session, "calibration")
    _sample(comfy, clone)
    first = pack.recording.save_recording(session, "calibration")
    with pytest.raises(pack.host.UserError, match="change its seed"):
        pack.recording.save_recording(session, "calibration")  # a cached KSampler did not run again
    _sample(comfy, clone, steps=1, seed=3)
    second = pack.recording.save_recording(session, "calibration")
    assert (first.calls, second.calls) == (3, 1)
    assert first.path.endswith("calibration_00001_.safetensors")
    assert second.path.endswith("calibration_00002_.safetensors")


def test_keep_recording_accumulates_over_runs(pack, comfy, tiny_model, tmp_path):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    clone, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, clone, steps=2, seed=1)
    first = pack.recording.save_recording(session, "queued", keep=True)
    _sample(comfy, clone, steps=2, seed=2)
    second = pack.recording.save_recording(session, "queued", keep=True)
    assert (first.calls, second.calls) == (2, 4) and session.nbytes == second.nbytes > 0
    assert "held: recording goes on" in second.text()

    reference_clone, reference = pack.recording.record_model(patcher, 64)
    _sample(comfy, reference_clone, steps=2, seed=1)
    _sample(comfy, reference_clone, steps=2, seed=2)
    together = reference.save(tmp_path / "together.safetensors")
    assert Path(second.path).read_bytes() == Path(together.path).read_bytes()
    assert pack.recording.save_recording(session, "queued").calls == 4 and session.nbytes == 0


def test_a_bad_prefix_saves_nothing_and_keeps_the_recording(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    clone, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, clone)
    with pytest.raises(pack.host.UserError, match="filename_prefix"):
        pack.recording.save_recording(session, "../escape")
    assert session.nbytes > 0
    assert pack.recording.save_recording(session, "ok").layers == 2


def test_convert_with_the_recording_uses_gptq(pack, comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    clone, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, clone, steps=4)
    path = pack.recording.save_recording(session, "calibration").path
    options = pack.options.convert_options(num_iter=5, calib_samples=8, calibration=path)
    summary = pack.conversion.convert_model(patcher, options, "calibrated", node_id="9")
    assert summary.methods == {"gptq": 4}
    assert "4 gptq" in pack.conversion.report_text(summary)


def test_calibration_is_refused_with_round_to_nearest(pack, comfy, tiny_model, tmp_path, files_below):
    """The engine's rule (the same for the command line): the file would be ignored."""
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    with pytest.raises(ValueError, match="needs rounding 'auto' or 'learned'"):
        options = pack.options.convert_options(rounding="nearest", calibration=str(tmp_path / "x.safetensors"))
        pack.conversion.convert_model(patcher, options, "nearest", node_id="9")
    assert files_below(comfy.models) == []
    assert pack.options.convert_options(rounding="nearest").calibration is None


def _recorded_on(module: torch.nn.Module, path) -> str:
    with Recorder(module) as recorder, torch.no_grad():
        for child in module.modules():
            if isinstance(child, torch.nn.Linear):
                child(torch.randn(3, child.in_features))
    recorder.save(path)
    return str(path)


def test_a_calibration_of_another_model_is_refused(pack, comfy, tiny_model, tmp_path, files_below):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    other = _recorded_on(torch.nn.Sequential(torch.nn.Linear(32, 32)), tmp_path / "other.safetensors")
    options = pack.options.convert_options(calibration=other)
    with pytest.raises(ValueError, match="none of the weights"):
        pack.conversion.convert_model(patcher, options, "wrong", node_id="9")
    assert comfy.server.events("fp8_scaled.error")[-1]["node"] == "9"
    assert files_below(comfy.models) == []


def test_a_calibration_with_other_shapes_is_the_engines_error(pack, comfy, tiny_model, tmp_path, files_below):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    narrow = torch.nn.Module()
    narrow.blocks = torch.nn.ModuleList([torch.nn.Module()])
    narrow.blocks[0].attn = torch.nn.Module()
    narrow.blocks[0].attn.q = torch.nn.Linear(16, 32)
    path = _recorded_on(narrow, tmp_path / "narrow.safetensors")
    options = pack.options.convert_options(calibration=path, num_iter=2, calib_samples=4)
    with pytest.raises(ValueError, match="recorded on another model"):
        pack.conversion.convert_model(patcher, options, "wrong", node_id="9")
    assert files_below(comfy.models) == []


def test_calibration_choices_and_paths(pack, comfy, tmp_path):
    host = pack.host
    assert host.calibration_files() == ["none"]
    folder = comfy.models / "fp8_calibration"
    assert host.calibration_folders() == [str(folder)]
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "sub/b.SAFETENSORS", "notes.txt", ".a.safetensors.x.tmp"):
        (folder / name).write_bytes(b"")
    assert host.calibration_files() == ["none", "a.safetensors", "sub/b.SAFETENSORS"]
    assert host.resolve_calibration("none") is None
    assert host.resolve_calibration("sub/b.SAFETENSORS") == folder / "sub" / "b.SAFETENSORS"
    assert host.resolve_calibration("none", str(folder / "a.safetensors")) == folder / "a.safetensors"
    with pytest.raises(host.UserError, match="not found"):
        host.resolve_calibration("gone.safetensors")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    for path in (str(outside), str(folder / ".." / "fp8_calibration" / ".." / "x"), str(folder / "missing")):
        with pytest.raises(host.UserError, match="not a file inside the fp8_calibration folder"):
            host.resolve_calibration("a.safetensors", path)


def test_cancel_stops_a_recorded_model_call_at_the_next_layer(pack, comfy, tiny_model, tmp_path):
    """Recording makes a model call slower than ComfyUI's per-step checks allow for: each layer checks."""
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    clone, session = pack.recording.record_model(patcher, 64)
    _sample(comfy, clone, steps=1)
    reached = []

    def cancelled_after_one_layer(diffusion_model, x):
        diffusion_model.blocks[0].attn.q.register_forward_pre_hook(
            lambda *_: comfy.model_management.interrupt_current_processing()
        )
        diffusion_model.blocks[0].mlp.fc.register_forward_pre_hook(lambda *_: reached.append(1))
        return _forward(diffusion_model, x)

    with pytest.raises(comfy.InterruptProcessingException):
        comfy.apply_model(clone, cancelled_after_one_layer, torch.randn(1, 4, 32), torch.ones(1))
    assert reached == [] and session.calls == 1  # stopped in the layer where Cancel was pressed
    assert comfy.model_management.processing_interrupted() is False

    comfy.model_management.interrupt_current_processing()
    with pytest.raises(comfy.InterruptProcessingException):
        session.save(tmp_path / "cancelled.safetensors")
    assert list(tmp_path.iterdir()) == []
    assert session.save(tmp_path / "saved.safetensors").layers == 4  # the recording is intact


def _linears(root: torch.nn.Module, paths: list[str], width: int = 32) -> None:
    for path in paths:
        *parents, leaf = path.split(".")
        owner = root
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.add_module(leaf, torch.nn.Linear(width, width))


def test_text_encoder_recording_names_layers_as_their_files(pack, comfy, tmp_path):
    """A CLIP's cond_stage_model holds each encoder under ``<name>.transformer``; the recording names a
    layer by its path below that, the key of the encoder's text_encoders/ file. CLIP-L is kept whole by
    the converter, so by default nothing of it is recorded."""
    t5 = [f"encoder.block.{i}.layer.{j}" for i in range(2) for j in range(2)]
    t5_layers = [f"{b}.SelfAttention.{p}" for b in t5[0::2] for p in "qkvo"] + [
        f"{b}.DenseReluDense.wo" for b in t5[1::2]
    ]
    clip_layers = [f"text_model.encoder.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.fc1")]
    encoders = torch.nn.Module()
    _linears(encoders, [f"t5xxl.transformer.{p}" for p in t5_layers] + [f"clip_l.transformer.{p}" for p in clip_layers])
    recording = pack.recording
    assert set(recording.text_encoder_layers(encoders, False).values()) == set(t5_layers)
    session = recording.RecordingSession(2**26, select=recording.text_encoder_layers)

    def encode() -> None:
        x = torch.randn(3, 32)
        for module in encoders.modules():
            if isinstance(module, torch.nn.Linear):
                module(x)

    session.record(encoders, encode)
    session.record(encoders, encode)
    report = session.save(tmp_path / "te.safetensors")
    assert (report.layers, report.calls) == (len(t5_layers), 2)
    with RecordedStatistics(report.path) as statistics:
        assert statistics.names == {f"{p}.weight" for p in t5_layers}
    assert not any(m._forward_hooks for m in encoders.modules())  # unhooked after each encoding


def test_text_encoder_layers_are_named_below_the_outermost_transformer(pack):
    encoders = torch.nn.Module()
    blocks = [f"t5xxl.transformer.encoder.block.{i}.layer.0.SelfAttention.{p}" for i in range(2) for p in "qk"]
    _linears(encoders, [*blocks, "t5xxl.transformer.encoder.block.0.layer.0.transformer.wo"])
    names = set(pack.recording.text_encoder_layers(encoders, all_layers=True).values())
    assert "encoder.block.0.layer.0.transformer.wo" in names and "wo" not in names
