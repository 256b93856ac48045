"""nodes/host.py against the ComfyUI doubles: save paths, metadata, source files, events, progress."""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest


def _diffusion_dir(comfy):
    return comfy.models / "diffusion_models"  # the folder named like the kind (ComfyUI lists models/unet first)


# --------------------------------------------------------------------------------------------------
# save_path
# --------------------------------------------------------------------------------------------------


def test_save_path_numbers_like_comfyui(pack, comfy):
    folder = _diffusion_dir(comfy)
    first = pack.host.save_path("fp8/model", "diffusion_models")
    assert first == folder / "fp8" / "model_00001_.safetensors"
    assert first.parent.is_dir()  # the subfolder is created
    assert not first.exists()
    first.write_bytes(b"")
    assert pack.host.save_path("fp8/model", "diffusion_models") == folder / "fp8" / "model_00002_.safetensors"
    (folder / "fp8" / "model_00007_.safetensors").write_bytes(b"")
    (folder / "fp8" / "other_00042_.safetensors").write_bytes(b"")  # another prefix does not count
    assert pack.host.save_path("fp8/model", "diffusion_models").name == "model_00008_.safetensors"
    assert pack.host.save_path("fp8/other", "diffusion_models").name == "other_00043_.safetensors"


def test_save_path_without_subfolder_and_with_nested_ones(pack, comfy):
    assert pack.host.save_path("flat", "checkpoints") == comfy.models / "checkpoints" / "flat_00001_.safetensors"
    nested = pack.host.save_path("  a/b c/d-e.f/name  ", "text_encoders")  # surrounding spaces are dropped
    assert nested == comfy.models / "text_encoders" / "a" / "b c" / "d-e.f" / "name_00001_.safetensors"
    assert nested.parent.is_dir()


def test_save_folder_is_the_one_the_source_came_from_else_the_one_named_like_the_kind(pack, comfy):
    models = comfy.models
    assert comfy.folder_paths.get_folder_paths("diffusion_models")[0] == str(models / "unet")  # ComfyUI's order
    assert pack.host.save_folder("diffusion_models") == str(models / "diffusion_models")
    assert pack.host.save_folder("text_encoders") == str(models / "text_encoders")
    from_unet = _touch(models / "unet" / "sub" / "flux.safetensors")
    assert pack.host.save_folder("diffusion_models", from_unet) == str(models / "unet")
    saved = pack.host.save_path("fp8/x", "diffusion_models", from_unet)
    assert saved == models / "unet" / "fp8" / "x_00001_.safetensors"
    from_clip = _touch(models / "clip" / "t5.safetensors")
    assert pack.host.save_folder("text_encoders", from_clip) == str(models / "clip")
    elsewhere = _touch(models / "loras" / "l.safetensors")  # not one of the kind's folders: the named one
    assert pack.host.save_folder("diffusion_models", elsewhere) == str(models / "diffusion_models")
    comfy.folder_paths.folder_names_and_paths["fp8_calibration"] = ([str(models / "calib_a")], set())
    assert pack.host.save_folder("fp8_calibration") == str(models / "calib_a")  # none named so: the first


def test_save_path_expands_comfyui_date_variables(pack, comfy):
    path = pack.host.save_path("%year%/m", "diffusion_models")
    assert path.parent.name == str(time.localtime().tm_year)


@pytest.mark.parametrize(
    "prefix",
    [
        "..",
        "../escape",
        "fp8/../../escape",
        "a/../b",
        "/abs/path",
        "//server/share",
        "",
        "   ",
        "a<b",
        "a>b",
        "a|b",
        "a\0b",
        'a"b',
        "a*b",
        "a?b",
        "C:\\models\\x",
        "c:model",
        "~/x",
        "a\nb",
    ],
)
def test_save_path_refuses_bad_prefixes(pack, comfy, prefix):
    before = sorted(p for p in comfy.models.parent.rglob("*"))
    with pytest.raises(pack.host.UserError, match="filename_prefix") as info:
        pack.host.save_path(prefix, "diffusion_models")
    assert isinstance(info.value, ValueError)  # shown as a plain message
    assert sorted(p for p in comfy.models.parent.rglob("*")) == before  # nothing created


def test_save_path_refuses_a_symlink_out_of_the_folder(pack, comfy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    folder = _diffusion_dir(comfy)
    folder.mkdir(parents=True)
    os.symlink(outside, folder / "link")
    with pytest.raises(pack.host.UserError, match="filename_prefix 'link/x' points outside"):
        pack.host.save_path("link/x", "diffusion_models")
    assert list(outside.iterdir()) == []


def test_save_path_error_for_a_file_used_as_folder_names_the_real_cause(pack, comfy):
    folder = _diffusion_dir(comfy)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(pack.host.UserError, match="filename_prefix") as info:
        pack.host.save_path("model.safetensors/x", "diffusion_models")
    assert "points outside" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# save_metadata
# --------------------------------------------------------------------------------------------------


def test_save_metadata_writes_prompt_and_each_extra_pnginfo_key(pack, comfy):
    prompt = {"3": {"class_type": "FP8ScaledConvertModel", "inputs": {"seed": 0}}}
    extra = {"workflow": {"nodes": [{"id": 3}], "links": []}, "note": "ünïcode"}
    metadata = pack.host.save_metadata(prompt, extra)
    assert metadata == {
        "prompt": json.dumps(prompt),
        "workflow": json.dumps(extra["workflow"]),
        "note": '"\\u00fcn\\u00efcode"',
    }
    assert all(isinstance(v, str) for v in metadata.values())
    assert json.loads(metadata["workflow"]) == extra["workflow"]


def test_save_metadata_without_prompt_or_workflow(pack, comfy):
    assert pack.host.save_metadata(None, None) == {}
    assert pack.host.save_metadata(None, {"workflow": {}}) == {"workflow": "{}"}


def test_save_metadata_respects_disable_metadata(pack, comfy):
    comfy.cli_args.args.disable_metadata = True
    assert pack.host.save_metadata({"1": {}}, {"workflow": {}}) == {}


def test_save_metadata_without_cli_args_still_writes(pack, comfy, monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy.cli_args", None)  # import raises ImportError
    assert pack.host.save_metadata({"1": {}}, None) == {"prompt": '{"1": {}}'}


# --------------------------------------------------------------------------------------------------
# source_files / resolve_source
# --------------------------------------------------------------------------------------------------


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_source_files_lists_safetensors_of_the_three_folders(pack, comfy):
    models = comfy.models
    _touch(models / "unet" / "a.safetensors")
    _touch(models / "diffusion_models" / "sub" / "b.safetensors")
    _touch(models / "diffusion_models" / "c.ckpt")  # listed by ComfyUI, not a converter input
    _touch(models / "checkpoints" / "ckpt.safetensors")
    _touch(models / "text_encoders" / "t5.safetensors")
    _touch(models / "clip" / "clip_l.safetensors")
    _touch(models / "loras" / "lora.safetensors")  # not a source folder
    assert pack.host.source_files() == [
        "diffusion_models/a.safetensors",
        f"diffusion_models/sub{os.sep}b.safetensors",
        "checkpoints/ckpt.safetensors",
        "text_encoders/clip_l.safetensors",
        "text_encoders/t5.safetensors",
    ]


def test_source_files_extension_check_is_case_insensitive_like_comfyui(pack, comfy):
    _touch(comfy.models / "checkpoints" / "Model.SafeTensors")
    assert comfy.folder_paths.get_filename_list("checkpoints") == ["Model.SafeTensors"]
    assert pack.host.source_files() == ["checkpoints/Model.SafeTensors"]


def test_source_files_when_folders_are_missing(pack, comfy):
    assert pack.host.source_files() == []


def test_resolve_source_round_trips_every_listed_entry(pack, comfy):
    models = comfy.models
    expected = {
        "diffusion_models/sub/b.safetensors": models / "diffusion_models" / "sub" / "b.safetensors",
        "checkpoints/ckpt.safetensors": models / "checkpoints" / "ckpt.safetensors",
        "text_encoders/clip_l.safetensors": models / "clip" / "clip_l.safetensors",
    }
    for path in expected.values():
        _touch(path)
    for entry in pack.host.source_files():
        folder, path = pack.host.resolve_source(entry)
        assert folder == entry.split("/")[0]
        assert path == expected[entry.replace(os.sep, "/")]
        assert path.is_absolute() and path.is_file()


@pytest.mark.parametrize(
    "entry",
    ["loras/lora.safetensors", "diffusion_models/", "diffusion_models", "", "/etc/passwd", "unet/a.safetensors"],
)
def test_resolve_source_refuses_other_folders(pack, comfy, entry):
    with pytest.raises(pack.host.UserError, match="pick a file from diffusion_models, checkpoints, text_encoders"):
        pack.host.resolve_source(entry)


def test_resolve_source_of_a_missing_file_is_a_user_error(pack, comfy):
    with pytest.raises(pack.host.UserError, match="'checkpoints' with filename 'gone.safetensors' not found"):
        pack.host.resolve_source("checkpoints/gone.safetensors")


def test_resolve_source_cannot_climb_out_of_the_folder(pack, comfy):
    _touch(comfy.models / "secret.safetensors")
    with pytest.raises(pack.host.UserError, match="not found"):
        pack.host.resolve_source("checkpoints/../secret.safetensors")


# --------------------------------------------------------------------------------------------------
# devices, interrupts, events, progress
# --------------------------------------------------------------------------------------------------


def test_device_interrupt_and_memory_go_to_model_management(pack, comfy):
    assert str(pack.host.torch_device()) == "cpu"
    pack.host.check_interrupt()  # no interrupt: nothing happens
    comfy.model_management.interrupt_current_processing()
    with pytest.raises(comfy.InterruptProcessingException):
        pack.host.check_interrupt()
    assert comfy.model_management.processing_interrupted() is False  # ComfyUI clears the flag as it raises
    pack.host.free_memory()
    assert comfy.model_management.soft_empty_cache_calls == 1


def test_interrupt_is_not_an_exception(comfy):
    assert not issubclass(comfy.InterruptProcessingException, Exception)
    assert issubclass(comfy.InterruptProcessingException, BaseException)


def test_send_uses_the_namespaced_event(pack, comfy):
    pack.host.send("progress", {"node": "7"})
    # to the browser that queued the prompt (PromptServer.client_id), like ComfyUI's own progress messages
    assert comfy.server.messages == [("fp8_scaled.progress", {"node": "7"}, "client-1")]


def test_send_without_a_server_is_silent(pack, comfy, monkeypatch):
    comfy.modules["server"].PromptServer.instance = None
    pack.host.send("progress", {"node": "7"})
    monkeypatch.setitem(sys.modules, "server", None)
    pack.host.send("progress", {"node": "7"})
    assert comfy.server.messages == []


PROGRESS_FIELDS = {"node", "tensor", "index", "total", "quantized", "kept", "elapsed", "eta", "error", "working"}
PROGRESS_FIELDS |= {"cancelling", "share"}
WORKING_FIELDS = {"method", "step", "steps", "unit", "tensor_seconds"}


def test_node_progress_drives_the_bar_and_the_panel(pack, comfy):
    progress = pack.host.NodeProgress("12", 3)
    bar = comfy.utils.bars[-1]
    assert (bar.total, bar.node_id) == (3, "12")
    reports = [  # the bar stands at the engine's share of the work, not at the tensors' count
        SimpleNamespace(name="a.bias", index=1, total=3, quantized=False, error_after=0.0, eta=None, share=0.0),
        SimpleNamespace(name="a.weight", index=2, total=3, quantized=True, error_after=0.02, eta=12.3456, share=0.25),
        SimpleNamespace(name="b.weight", index=3, total=3, quantized=True, error_after=0.04, eta=0.0, share=1.0),
    ]
    for report in reports:
        progress(report)
    assert bar.updates == [(0, 3), (0.75, 3), (3, 3)] and bar.current == 3
    assert comfy.hook_calls[0] == {"value": 0, "max": 3, "node": "12"}  # first and last always reach the UI
    assert comfy.hook_calls[-1] == {"value": 3, "max": 3, "node": "12"}
    events = comfy.server.events("fp8_scaled.progress")
    assert set(events[0]) == PROGRESS_FIELDS
    assert not any(e["working"] or e["cancelling"] for e in events)
    assert [e["tensor"] for e in events] == ["a.bias", "a.weight", "b.weight"]
    assert [(e["quantized"], e["kept"]) for e in events] == [(0, 1), (1, 1), (2, 1)]
    assert [e["error"] for e in events] == pytest.approx([0.0, 0.02, 0.03])
    assert [e["eta"] for e in events] == [None, 12.35, 0.0]  # the engine's; null: no basis yet
    assert [e["share"] for e in events] == [0.0, 0.25, 1.0]
    assert all(e["elapsed"] >= 0 for e in events)
    assert all(e["node"] == "12" and e["total"] == 3 for e in events)


# --------------------------------------------------------------------------------------------------
# resolve_model_file (a path handed over by another node)
# --------------------------------------------------------------------------------------------------


def test_resolve_model_file_accepts_files_in_the_model_folders(pack, comfy):
    inside = _touch(comfy.models / "unet" / "fp8" / "a_00001_.safetensors")
    assert pack.host.resolve_model_file(str(inside)) == inside.resolve()
    clip = _touch(comfy.models / "clip" / "t.safetensors")
    assert pack.host.resolve_model_file(str(clip)) == clip.resolve()
    roundabout = comfy.models / "checkpoints" / ".." / "unet" / "fp8" / "a_00001_.safetensors"
    assert pack.host.resolve_model_file(str(roundabout)) == inside.resolve()


def test_resolve_model_file_refuses_anything_else(pack, comfy, tmp_path):
    outside = _touch(tmp_path / "outside.safetensors")
    lora = _touch(comfy.models / "loras" / "l.safetensors")
    (comfy.models / "checkpoints").mkdir(parents=True)
    os.symlink(outside, comfy.models / "checkpoints" / "link.safetensors")
    for path in (
        outside,
        lora,
        comfy.models / "checkpoints" / "link.safetensors",  # points outside
        comfy.models / "checkpoints" / "missing.safetensors",
        comfy.models / "checkpoints",  # a folder
        comfy.models / "checkpoints" / ".." / ".." / "outside.safetensors",
    ):
        with pytest.raises(pack.host.UserError, match="is not a file inside the diffusion_models"):
            pack.host.resolve_model_file(str(path))


def test_node_progress_moves_inside_a_tensor_and_says_cancelling(pack, comfy):
    """Between finished tensors the bar moves with the work done inside the tensor being rounded,
    the panel names that tensor with its steps and the engine's ETA; "cancelling" leaves the bar alone."""
    Activity = pack.job.Activity
    progress = pack.host.NodeProgress("12", 2)
    bar = comfy.utils.bars[-1]
    progress(SimpleNamespace(name="a.weight", index=1, total=2, quantized=True, error_after=0.02, eta=40.0, share=0.5))
    progress.activity(Activity("b.weight", "learned", 250, 1000, 3.0, eta=31.5, share=0.625))
    assert bar.updates[-1] == (1.25, 2)
    event = comfy.server.events("fp8_scaled.progress")[-1]
    assert set(event) == PROGRESS_FIELDS | WORKING_FIELDS
    assert event["tensor"] == "b.weight" and event["working"] is True and event["cancelling"] is False
    assert (event["step"], event["steps"], event["tensor_seconds"]) == (250, 1000, 3.0)
    assert event["method"] == "learned" and event["unit"] == "optimiser steps"
    assert event["index"] == 1 and event["eta"] == 31.5 and event["share"] == 0.625

    progress.activity(Activity("b.weight", "learned", 300, 1000, 3.5, cancelling=True))
    assert bar.updates[-1] == (1.25, 2)  # the bar's hook would check for the interrupt again
    event = comfy.server.events("fp8_scaled.progress")[-1]
    assert event["cancelling"] is True and event["working"] is False and event["step"] == 300
