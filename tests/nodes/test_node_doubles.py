"""The ComfyUI doubles behave like ComfyUI: documented behaviour always, and the folder_paths double
side by side with the real ``folder_paths.py`` when ``COMFYUI_PATH`` points at a ComfyUI checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def test_doubles_are_installed_only_for_the_test(comfy):
    assert sys.modules["comfy"] is comfy.modules["comfy"]
    import comfy.utils as utils  # the package attribute, as ``import comfy.utils`` binds it
    import folder_paths

    assert utils is comfy.utils and folder_paths is comfy.folder_paths


def test_installing_the_doubles_is_undone(doubles_installer, tmp_path):
    names = ("comfy", "comfy.utils", "comfy.model_management", "comfy.cli_args", "comfy.sd", "folder_paths", "server")
    names += ("comfy.patcher_extension",)
    before = {name: sys.modules.get(name, "absent") for name in names}
    with pytest.MonkeyPatch.context() as patch:
        env = doubles_installer(patch, tmp_path / "models")
        assert all(sys.modules[name] is env.modules[name] for name in names)
    assert {name: sys.modules.get(name, "absent") for name in names} == before


def test_progress_bar_clamps_and_throttles_like_comfyui(comfy):
    bar = comfy.utils.ProgressBar(1000, node_id="1")
    for value in range(1, 1001):
        bar.update_absolute(value)
    bar.update_absolute(5000)
    assert bar.current == 1000
    values = [call["value"] for call in comfy.hook_calls]
    assert values[0] == 1 and values[-1] == 1000  # first and final always sent
    assert len(values) < 50  # the rest is throttled to one call per 0.1 s
    comfy.utils.set_progress_bar_global_hook(None)
    silent = comfy.utils.ProgressBar(3)
    silent.update_absolute(2)
    assert silent.current == 2 and len(comfy.hook_calls) == len(values)


def test_progress_hook_checks_for_interrupts_like_comfyuis_server(comfy):
    bar = comfy.utils.ProgressBar(3)
    comfy.model_management.interrupt_current_processing()
    with pytest.raises(comfy.InterruptProcessingException):
        bar.update_absolute(1)
    bar.update_absolute(2)  # the flag was cleared when it raised
    assert comfy.model_management.processing_interrupted() is False


def test_model_patcher_clone_keeps_wrappers_apart_like_comfyui(comfy, tiny_model):
    patcher = comfy.ModelPatcher(tiny_model(blocks=1))
    calls = []

    def outer(executor, x, *args):
        calls.append(("outer", executor.class_obj is patcher.model))
        return executor(x + 1, *args)

    def inner(executor, x, *args):
        calls.append(("inner", float(x[0])))
        return executor(x * 10, *args)

    patcher.add_wrapper_with_key("apply_model", "a", outer)
    clone = patcher.clone()
    clone.add_wrapper_with_key("apply_model", "b", inner)
    assert clone.model is patcher.model and patcher.wrappers == {"apply_model": {"a": [outer]}}
    out = comfy.apply_model(clone, lambda dm, x: x, torch.zeros(1), torch.zeros(1))
    assert float(out[0]) == 10.0 and calls == [("outer", True), ("inner", 1.0)]  # in order, each once
    assert float(comfy.apply_model(patcher, lambda dm, x: x, torch.zeros(1), torch.zeros(1))[0]) == 1.0


def test_get_save_image_path_double(comfy, tmp_path):
    out = tmp_path / "out"
    folder, name, counter, subfolder, prefix = comfy.folder_paths.get_save_image_path("a/b/m", str(out))
    assert (folder, name, counter, subfolder, prefix) == (str(out / "a/b"), "m", 1, "a/b", "a/b/m")
    for existing in ("m_00003_.safetensors", "m_00009_.png", "m_x.safetensors", "mm_00050_.safetensors"):
        (out / "a/b" / existing).write_bytes(b"")
    assert comfy.folder_paths.get_save_image_path("a/b/m", str(out))[2] == 10
    for outside in ("../m", "/abs/m", "a/../../m"):
        with pytest.raises(Exception, match="outside the output folder"):
            comfy.folder_paths.get_save_image_path(outside, str(out))


PARITY = textwrap.dedent(
    """
    import importlib.util, json, os, sys, tempfile
    comfyui, doubles_path = sys.argv[1], sys.argv[2]
    sys.path.insert(0, comfyui)
    import folder_paths as real
    spec = importlib.util.spec_from_file_location("comfy_doubles_parity", doubles_path)
    doubles = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = doubles
    spec.loader.exec_module(doubles)

    def outcome(function, *args):
        try:
            result = ["ok", function(*args)]
        except FileNotFoundError as exc:
            result = ["FileNotFoundError", str(exc)]
        except Exception as exc:
            result = ["Exception", str(exc).split(chr(10))[0]]
        return json.loads(json.dumps(result).replace(base, "<base>"))  # each run has its own folder

    results = {"real": [], "double": []}
    for kind in ("real", "double"):
        with tempfile.TemporaryDirectory() as base:
            base = os.path.realpath(base)
            models = os.path.join(base, "models")
            fake = doubles.build(__import__("pathlib").Path(models)).folder_paths
            module = real if kind == "real" else fake
            if kind == "real":
                real.folder_names_and_paths.clear()
                for key, (paths, extensions) in fake.folder_names_and_paths.items():
                    real.folder_names_and_paths[key] = (list(paths), extensions)
                real.filename_list_cache.clear()
            record = results[kind]
            for rel in ("unet/a.safetensors", "unet/sub/b.SAFETENSORS", "unet/c.txt", "diffusion_models/d.sft",
                        "clip/e.safetensors", "checkpoints/f.ckpt", "checkpoints/.git/g.safetensors"):
                path = os.path.join(models, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
            out = os.path.join(models, "unet")
            os.makedirs(os.path.join(base, "elsewhere"))
            os.symlink(os.path.join(base, "elsewhere"), os.path.join(out, "link"))
            for existing in ("m_00003_.safetensors", "m_00009_.png", "m_x.safetensors", "mm_00050_.safetensors",
                             "M_00070_.safetensors", "m_00011.safetensors", ".m_00020_.safetensors.tmp"):
                open(os.path.join(out, existing), "wb").close()
            for folder in ("diffusion_models", "text_encoders", "checkpoints"):  # the names the pack uses
                record.append(outcome(module.get_folder_paths, folder))
                record.append(outcome(module.get_filename_list, folder))
            calibration = os.path.join(models, "fp8_calibration")
            module.add_model_folder_path("fp8_calibration", calibration)
            module.add_model_folder_path("fp8_calibration", calibration)  # a second call changes nothing
            module.add_model_folder_path("diffusion_models", os.path.join(base, "last"))
            os.makedirs(os.path.join(calibration, "sub"))
            for rel in ("c.safetensors", "sub/d.txt", ".c.safetensors.x.tmp"):
                open(os.path.join(calibration, rel), "wb").close()
            for folder in ("fp8_calibration", "diffusion_models"):
                record.append(outcome(module.get_folder_paths, folder))
                record.append(outcome(module.get_filename_list, folder))
            record.append(outcome(module.get_full_path_or_raise, "fp8_calibration", "c.safetensors"))
            for folder, name in (("checkpoints", "f.ckpt"), ("diffusion_models", "sub/b.SAFETENSORS"),
                                 ("diffusion_models", "../unet/a.safetensors"), ("checkpoints", "none.safetensors"),
                                 ("text_encoders", "e.safetensors")):
                record.append(outcome(module.get_full_path_or_raise, folder, name))
            for prefix in ("m", "mm", "M", "new/deeper/m", "x/../m", "m/", "%year%/m", "../m", "/abs/m",
                           "a/../../m", "link/m", ".", "m.v2"):
                record.append(outcome(module.get_save_image_path, prefix, out))
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH or ".") / "folder_paths.py").is_file(),
    reason="set COMFYUI_PATH to a ComfyUI checkout to compare the folder_paths double with the real module",
)
def test_folder_paths_double_matches_comfyui(tmp_path):
    done = subprocess.run(
        [sys.executable, "-I", "-c", PARITY, COMFYUI_PATH, str(HERE / "comfy_doubles.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results["real"]) == len(results["double"]) > 20
    for real, double in zip(results["real"], results["double"], strict=True):
        assert double == real
