"""nodes/conversion.py end to end with the ComfyUI doubles: files, metadata, progress, events, cancel."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct

import pytest
import torch

QUICK = dict(num_iter=5, calib_samples=8)
PROMPT = {"5": {"class_type": "FP8ScaledConvertModel", "inputs": {"filename_prefix": "fp8/tiny"}}}
EXTRA = {"workflow": {"nodes": [{"id": 5, "type": "FP8ScaledConvertModel"}], "links": []}}
PROGRESS_FIELDS = {"node", "tensor", "index", "total", "quantized", "kept", "elapsed", "eta", "error", "working"}
PROGRESS_FIELDS |= {"cancelling", "share"}
Q = "blocks.0.attn.q.weight"


def _patched_model(comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=2))
    original = patcher.model.state_dict()["diffusion_model." + Q]
    diff = torch.randn(original.shape, generator=torch.Generator().manual_seed(9)) * 0.1  # about 60 % of |w|
    patcher.add_patches({"diffusion_model." + Q: (diff,)})
    return patcher, original.float(), (original.float() + diff).to(original.dtype).float()


def _dequantized(pack, reader, key):
    base = key.removesuffix(".weight")
    return reader.read(key).float() * reader.read(base + ".weight_scale").float()


def _finished(comfy) -> list[dict]:
    """The progress events of finished tensors (not those of a tensor being rounded, nor "cancelling")."""
    return [e for e in comfy.server.events("fp8_scaled.progress") if not (e["working"] or e["cancelling"])]


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_convert_model_end_to_end(pack, comfy, tiny_model, files_below):
    patcher, original, patched = _patched_model(comfy, tiny_model)
    options = pack.options.convert_options(rounding="nearest")
    summary = pack.conversion.convert_model(patcher, options, "fp8/tiny", PROMPT, EXTRA, node_id="5")

    folder = comfy.models / "diffusion_models"
    output = folder / "fp8" / "tiny_00001_.safetensors"
    assert summary.output == str(output)
    assert files_below(comfy.models) == ["diffusion_models/fp8/tiny_00001_.safetensors"]  # no temporary file left
    assert "fp8/tiny_00001_.safetensors" in comfy.folder_paths.get_filename_list("diffusion_models")

    state = patcher.model.diffusion_model.state_dict()
    with pack.io.SafetensorsReader(output) as reader:
        assert reader.metadata["prompt"] == json.dumps(PROMPT)
        assert reader.metadata["workflow"] == json.dumps(EXTRA["workflow"])
        assert json.loads(reader.metadata["quant_core"])["quantized"] == 4
        assert pack.formats.detect(list(reader.tensors), reader.metadata).name == "comfy"
        weight = _dequantized(pack, reader, Q)
        assert _relative(weight, patched) < 0.05  # the LoRA-style patch is baked in
        assert _relative(weight, original) > 0.3
        for name in ("blocks.1.attn.q.weight", "blocks.0.mlp.fc.weight"):
            assert reader.tensors[name].dtype == torch.float8_e4m3fn
            assert _relative(_dequantized(pack, reader, name), state[name].float()) < 0.05
        for name in ("blocks.0.attn.q.bias", "blocks.0.norm.weight"):  # kept bit for bit
            assert torch.equal(reader.read(name), state[name])
        assert not any(k.startswith(("diffusion_model.", "model_sampling")) for k in reader.tensors)

    total = len(state)
    assert (summary.quantized, summary.kept) == (4, total - 4)
    bar = comfy.utils.bars[-1]
    assert (bar.node_id, bar.total, bar.current) == ("5", total, total)
    values = [value for value, _ in bar.updates]  # the share of the work done, out of ``total``
    assert values == sorted(values) and values[-1] == total and len(values) >= total
    assert values[0] < total  # it moves as the work is done
    assert comfy.hook_calls[-1] == {"value": total, "max": total, "node": "5"}

    events = _finished(comfy)
    assert len(events) == total
    assert all(set(e) == PROGRESS_FIELDS for e in events)
    assert [e["index"] for e in events] == list(range(1, total + 1))
    assert {e["tensor"] for e in events} == set(state)
    assert all(e["node"] == "5" and e["total"] == total for e in events)
    assert all(e["quantized"] + e["kept"] == e["index"] for e in events)
    assert (events[-1]["quantized"], events[-1]["kept"]) == (4, total - 4)
    assert events[-1]["error"] == pytest.approx(summary.mean_error)
    first = next(i for i, e in enumerate(events) if e["quantized"])  # no ETA before a weight is rounded
    assert all(e["eta"] is None for e in events[:first]) and all(e["eta"] >= 0 for e in events[first:])
    assert events[-1]["eta"] == 0 and all(isinstance(e["elapsed"], float) for e in events)

    done = comfy.server.events("fp8_scaled.done")
    assert len(done) == 1 and comfy.server.events("fp8_scaled.error") == []
    assert done[0]["node"] == "5" and done[0]["output"] == str(output)
    assert (done[0]["quantized"], done[0]["kept"]) == (4, total - 4)
    assert done[0]["bytes_out"] < done[0]["bytes_in"]
    assert len(done[0]["worst"]) == 4 and done[0]["preset"] == summary.preset
    assert comfy.model_management.soft_empty_cache_calls >= 1

    # A second run numbers the next file.
    again = pack.conversion.convert_model(patcher, pack.options.convert_options(rounding="nearest"), "fp8/tiny")
    assert again.output == str(folder / "fp8" / "tiny_00002_.safetensors")
    with pack.io.SafetensorsReader(again.output) as reader:
        assert "prompt" not in reader.metadata and "workflow" not in reader.metadata


def test_convert_model_with_metadata_disabled(pack, comfy, tiny_model):
    comfy.cli_args.args.disable_metadata = True
    patcher, _, _ = _patched_model(comfy, tiny_model)
    summary = pack.conversion.convert_model(
        patcher, pack.options.convert_options(rounding="nearest"), "m", PROMPT, EXTRA
    )
    with pack.io.SafetensorsReader(summary.output) as reader:
        assert set(reader.metadata) == {"quant_core"}


def test_convert_model_uses_comfyuis_device(pack, comfy, tiny_model):
    options = pack.options.convert_options(rounding="nearest")
    pack.conversion.convert_model(comfy.ModelPatcher(tiny_model(blocks=1)), options, "dev")
    assert options.device == "cpu"


def test_learned_rounding_inside_inference_mode(pack, comfy, tiny_model):
    patcher, _, patched = _patched_model(comfy, tiny_model)
    options = pack.options.convert_options(rounding="learned", **QUICK)
    with torch.inference_mode():
        summary = pack.conversion.convert_model(patcher, options, "learned/tiny", node_id="9")
    assert summary.quantized == 4
    learned = [r for r in summary.reports if r.quantized]
    assert all(0 < r.error_after < 0.1 and r.error_before > 0 for r in learned)
    with pack.io.SafetensorsReader(summary.output) as reader:
        settings = json.loads(reader.metadata["quant_core"])["settings"]
        assert settings["rounding"] == "learned"
        assert settings["learned"]["num_iter"] == 5 and settings["learned"]["calib_samples"] == 8
        assert _relative(_dequantized(pack, reader, Q), patched) < 0.06
    assert len(comfy.server.events("fp8_scaled.done")) == 1


def test_convert_checkpoint_saves_into_the_same_folder(pack, comfy, tiny_model, files_below):
    state = {k: v.contiguous() for k, v in tiny_model(blocks=1).diffusion_model.state_dict().items()}
    source = comfy.models / "checkpoints" / "tiny.safetensors"
    pack.io.write_file(source, state, metadata={"modelspec.title": "tiny"})
    entry = "checkpoints/tiny.safetensors"
    assert entry in pack.host.source_files()

    options = pack.options.convert_options(rounding="nearest", format="legacy")
    summary = pack.conversion.convert_checkpoint(entry, options, "fp8/ckpt", PROMPT, EXTRA, node_id="3")
    output = comfy.models / "checkpoints" / "fp8" / "ckpt_00001_.safetensors"
    assert summary.output == str(output) and summary.input == str(source)
    assert files_below(comfy.models) == ["checkpoints/fp8/ckpt_00001_.safetensors", "checkpoints/tiny.safetensors"]
    with pack.io.SafetensorsReader(output) as reader:
        assert reader.metadata["modelspec.title"] == "tiny"  # the input's metadata is kept
        assert reader.metadata["prompt"] == json.dumps(PROMPT)
        assert reader.metadata["workflow"] == json.dumps(EXTRA["workflow"])
        assert pack.formats.detect(list(reader.tensors), reader.metadata).name == "legacy"
        assert reader.tensors["blocks.0.attn.q.weight"].dtype == torch.float8_e4m3fn
    assert options.device == "cpu"
    assert comfy.utils.bars[-1].current == len(state)
    assert len(_finished(comfy)) == len(state)
    assert len(comfy.server.events("fp8_scaled.done")) == 1


@pytest.mark.parametrize("root", ["unet", "diffusion_models"])
def test_convert_checkpoint_saves_next_to_its_source(pack, comfy, tiny_model, files_below, root):
    """ComfyUI lists both folders for diffusion models: the file goes into the one the source is in."""
    state = {k: v.contiguous() for k, v in tiny_model(blocks=1).diffusion_model.state_dict().items()}
    pack.io.write_file(comfy.models / root / "tiny.safetensors", state)
    options = pack.options.convert_options(rounding="nearest")
    summary = pack.conversion.convert_checkpoint("diffusion_models/tiny.safetensors", options, "fp8/t")
    assert summary.output == str(comfy.models / root / "fp8" / "t_00001_.safetensors")
    assert files_below(comfy.models) == [f"{root}/fp8/t_00001_.safetensors", f"{root}/tiny.safetensors"]


def test_convert_checkpoint_refuses_a_missing_file(pack, comfy):
    with pytest.raises(pack.host.UserError, match="not found"):
        pack.conversion.convert_checkpoint("checkpoints/none.safetensors", pack.options.convert_options(), "x")


@pytest.mark.parametrize("after", [1, 3])
def test_cancel_midway_leaves_nothing_behind(pack, comfy, tiny_model, files_below, after):
    patcher, _, _ = _patched_model(comfy, tiny_model)

    def cancel_after_n_updates(event, data):
        if event == "fp8_scaled.progress" and data["index"] == after and not data["cancelling"]:
            comfy.model_management.interrupt_current_processing()  # what the UI's Cancel does

    comfy.server.listeners.append(cancel_after_n_updates)
    options = pack.options.convert_options(rounding="nearest")
    with pytest.raises(comfy.InterruptProcessingException):
        pack.conversion.convert_model(patcher, options, "fp8/cancelled", node_id="4")

    assert files_below(comfy.models) == []  # neither the output nor a temporary file
    assert len(_finished(comfy)) == after  # stopped within one tensor
    assert comfy.server.events("fp8_scaled.progress")[-1]["cancelling"] is True  # "Cancelling…" before "Cancelled"
    errors = comfy.server.events("fp8_scaled.error")
    assert len(errors) == 1 and errors[0]["node"] == "4" and errors[0]["cancelled"] is True
    assert errors[0]["message"] == "InterruptProcessingException"
    assert comfy.server.events("fp8_scaled.done") == []
    assert comfy.model_management.soft_empty_cache_calls >= 1
    assert comfy.model_management.processing_interrupted() is False


def test_cancel_seen_by_the_progress_hook_also_leaves_nothing(pack, comfy, tiny_model, files_below):
    """Inside ComfyUI the progress bar's server hook checks for interrupts too (main.py)."""
    patcher, _, _ = _patched_model(comfy, tiny_model)
    checks = comfy.model_management.throw_exception_if_processing_interrupted
    comfy.model_management.interrupt_current_processing()
    with pytest.raises(comfy.InterruptProcessingException):
        pack.conversion.convert_model(patcher, pack.options.convert_options(rounding="nearest"), "pre")
    assert checks is comfy.model_management.throw_exception_if_processing_interrupted
    assert files_below(comfy.models) == []
    assert [e["cancelling"] for e in comfy.server.events("fp8_scaled.progress")] == [True]
    assert comfy.server.events("fp8_scaled.error")[0]["cancelled"] is True


def test_an_engine_error_is_reported_and_not_a_cancel(pack, comfy, tiny_model, files_below):
    patcher, _, _ = _patched_model(comfy, tiny_model)
    options = pack.options.convert_options(rounding="nearest")
    options.preset = "no-such-preset"  # the engine checks again what a Python caller changed
    with pytest.raises(ValueError, match="preset must be one of"):
        pack.conversion.convert_model(patcher, options, "bad", node_id="2")
    errors = comfy.server.events("fp8_scaled.error")
    assert len(errors) == 1 and errors[0]["cancelled"] is False and "no-such-preset" in errors[0]["message"]
    assert comfy.model_management.soft_empty_cache_calls >= 1
    assert files_below(comfy.models) == []


def _summary(pack, comfy, tiny_model):
    return pack.conversion.convert_model(
        comfy.ModelPatcher(tiny_model()), pack.options.convert_options(rounding="nearest"), "r"
    )


def test_report_text_lists_the_worst_layers(pack, comfy, tiny_model):
    errors = [0.011, 0.052, 0.003, 0.078, 0.020, 0.064, 0.040]
    reports = [
        pack.convert.TensorReport(
            name=f"layer{i}.weight", index=i + 1, total=9, nbytes=100, quantized=True, reason="", error_after=error
        )
        for i, error in enumerate(errors)
    ]
    reports.append(
        pack.convert.TensorReport(
            name="layer9.bias", index=8, total=9, nbytes=10, quantized=False, reason="bias", error_after=0.5
        )
    )
    summary = dataclasses.replace(_summary(pack, comfy, tiny_model), reports=reports)
    text = pack.conversion.report_text(summary)
    assert text.startswith(summary.text())
    lines = text.splitlines()
    worst = lines[lines.index("worst layers (weight: relative weight error; output: on held-out inputs):") + 1 :]
    assert worst == [
        "  7.800% weight  layer3.weight",
        "  6.400% weight  layer5.weight",
        "  5.200% weight  layer1.weight",
        "  4.000% weight  layer6.weight",
        "  2.000% weight  layer4.weight",
    ]  # the five largest errors of quantized layers, largest first; kept tensors never listed


def test_errors_of_different_measures_are_never_mixed(pack, comfy, tiny_model):
    """Calibrated and learned layers are judged on their outputs, round-to-nearest on the weight:
    the summary gives each measure its own line, and the worst layers say which one they show."""
    reports = [
        pack.convert.TensorReport("a.weight", 1, 3, 100, True, "", method="nearest", error_after=0.02),
        pack.convert.TensorReport("b.weight", 2, 3, 100, True, "", method="gptq", error_after=0.01),
        pack.convert.TensorReport("c.weight", 3, 3, 100, True, "", method="gptq", error_after=0.03),
    ]
    summary = dataclasses.replace(_summary(pack, comfy, tiny_model), reports=reports)
    errors = [line for line in summary.text().splitlines() if line.startswith("error")]
    assert errors == [
        "error     relative weight error (1 layers): mean 2.0000%, worst 2.0000% (a.weight)",
        "error     relative output error on held-out inputs (2 layers): mean 2.0000%, worst 3.0000% (c.weight)",
    ]
    assert [e["measure"] for e in summary.errors()] == [
        "relative weight error",
        "relative output error on held-out inputs",
    ]
    text = pack.conversion.report_text(summary)
    assert "  3.000% output  c.weight" in text and "  2.000% weight  a.weight" in text


def test_report_text_without_quantized_layers(pack, comfy, tiny_model):
    summary = dataclasses.replace(_summary(pack, comfy, tiny_model), reports=[])
    text = pack.conversion.report_text(summary)
    assert text == summary.text() + "\n" + pack.conversion.CHECKED and "worst layers" not in text


def test_report_text_of_a_real_run(pack, comfy, tiny_model):
    summary = _summary(pack, comfy, tiny_model)
    text = pack.conversion.report_text(summary)
    listed = re.findall(r"^ +\d+\.\d{3}% (?:weight|output) +(\S+)$", text, flags=re.M)
    assert len(listed) == 4 and set(listed) == {r.name for r in summary.reports if r.quantized}
    assert pack.conversion.CHECKED in text


def test_a_file_damaged_on_its_way_to_disk_is_refused_and_removed(pack, comfy, tiny_model, files_below, monkeypatch):
    """The node reads the written file back before it reports success: here a storage fault turns
    every 4-byte write (the float32 scales) into NaN."""
    real_pwrite = os.pwrite

    def corrupting(fd, data, offset):
        return real_pwrite(fd, struct.pack("<f", math.nan) if len(data) == 4 else data, offset)

    monkeypatch.setattr(os, "pwrite", corrupting)
    with pytest.raises(RuntimeError, match="loader-contract check"):
        _summary(pack, comfy, tiny_model)
    assert files_below(comfy.models) == []
    assert comfy.server.events("fp8_scaled.done") == []
    assert "not positive and finite" in comfy.server.events("fp8_scaled.error")[-1]["message"]


def test_a_bad_prefix_is_reported_before_anything_runs(pack, comfy, tiny_model, files_below):
    patcher, _, _ = _patched_model(comfy, tiny_model)
    with pytest.raises(pack.host.UserError, match="filename_prefix"):
        pack.conversion.convert_model(patcher, pack.options.convert_options(rounding="nearest"), "../out", node_id="8")
    errors = comfy.server.events("fp8_scaled.error")
    assert len(errors) == 1 and errors[0]["cancelled"] is False and "filename_prefix" in errors[0]["message"]
    assert comfy.utils.bars == []
    assert files_below(comfy.models.parent) == []


def test_events_go_to_the_browser_that_queued_the_prompt(pack, comfy, tiny_model):
    pack.conversion.convert_model(
        comfy.ModelPatcher(tiny_model(blocks=1)), pack.options.convert_options(rounding="nearest"), "c"
    )
    assert comfy.server.messages and {sid for _, _, sid in comfy.server.messages} == {"client-1"}


def test_convert_a_model_that_is_already_fp8(pack, comfy, tiny_model, files_below):
    """ComfyUI's fp8 Linear lists ``weight_scale`` and ``comfy_quant`` in its state dict: they must not be
    copied next to the freshly quantized weight."""
    model = tiny_model(blocks=1)
    attn = model.diffusion_model.blocks[0].attn
    original = attn.q.weight.detach().float()
    attn.q = comfy.QuantizedLinear(comfy.QuantizedTensor.from_float(attn.q.weight.detach()), attn.q.bias.detach())
    patcher = comfy.ModelPatcher(model)
    summary = pack.conversion.convert_model(patcher, pack.options.convert_options(rounding="nearest"), "requant")
    with pack.io.SafetensorsReader(summary.output) as reader:
        keys = list(reader.tensors)
        assert len(keys) == len(set(keys))
        assert keys.count(Q.removesuffix(".weight") + ".weight_scale") == 1
        assert reader.tensors[Q.removesuffix(".weight") + ".weight_scale"].dtype == torch.float32
        assert _relative(_dequantized(pack, reader, Q), original) < 0.08  # fp8 twice
    assert summary.quantized == 2
    assert files_below(comfy.models) == ["diffusion_models/requant_00001_.safetensors"]


@pytest.mark.parametrize("entry", ["model", "checkpoint"])
def test_the_size_budget_holds_on_both_convert_nodes(pack, comfy, tiny_model, entry):
    """max_size from the widget: the file on disk fits it, kept layers stay bf16, the report says which and why."""
    model = tiny_model(blocks=2)
    state = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
    source_bytes = sum(t.nbytes for t in state.values())
    pack.io.write_file(comfy.models / "checkpoints" / "tiny.safetensors", state)

    def run(max_size: str, prefix: str):
        options = pack.options.convert_options(rounding="nearest", max_size=max_size)
        if entry == "model":
            return pack.conversion.convert_model(comfy.ModelPatcher(model), options, prefix)
        return pack.conversion.convert_checkpoint("checkpoints/tiny.safetensors", options, prefix)

    smallest = run("", "all").bytes_out
    limit = (smallest + source_bytes) // 2
    summary = run(str(limit), "budget")
    assert 0 < os.path.getsize(summary.output) == summary.bytes_out <= limit
    report = pack.conversion.report_text(summary)
    kept = [layer.name for layer in summary.kept_layers]
    assert kept and all(name in report for name in kept) and f"{limit:,} bytes" in report
    with pack.io.SafetensorsReader(summary.output) as reader:
        assert all(reader.tensors[name].dtype == state[name].dtype for name in kept)
        assert sum(reader.tensors[name].dtype == torch.float8_e4m3fn for name in reader.tensors) == 4 - len(kept)
