"""Test doubles of the ComfyUI runtime the nodes call, written for these tests.

Only what the pack reaches: the functions ``nodes/host.py`` calls, the ``ModelPatcher`` state
``nodes/model_source.py`` reads with the load states ComfyUI puts it in, and ``apply_model``, the
way a sampling step reaches the recording wrapper. The real-ComfyUI suite (``tests/comfyui``) is the
proof that the pack works with ComfyUI itself.

They are not copies of ComfyUI's code; each one reproduces, in its own words, the behaviour of the
ComfyUI function named in its docstring (checked against ComfyUI v0.30.0: ``comfy/utils.py``,
``comfy/model_management.py``, ``comfy/model_patcher.py``, ``comfy/lora.py``,
``comfy/patcher_extension.py``, ``comfy/model_base.py``, ``comfy/sampler_helpers.py``, ``folder_paths.py``,
``server.py``, ``main.py``) for the arguments the pack passes, plus a little instrumentation (call
records) for the assertions. ``test_node_doubles.py`` compares the ``folder_paths`` double with the
real module when ``COMFYUI_PATH`` points at a ComfyUI checkout.

``build(models_dir)`` makes a fresh set of modules (``comfy``, ``comfy.utils``,
``comfy.model_management``, ``comfy.cli_args``, ``comfy.sd``, ``comfy.patcher_extension``, ``comfy.lora``,
``folder_paths``, ``server``); the ``comfy`` fixture in ``conftest.py`` puts them into ``sys.modules``
for one test and takes them out again afterwards.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
import types
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# comfy.utils
# --------------------------------------------------------------------------------------------------


def _utils_module() -> types.ModuleType:
    utils = types.ModuleType("comfy.utils")
    utils.PROGRESS_BAR_HOOK = None
    utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.1
    utils.PROGRESS_THROTTLE_MIN_PERCENT = 0.5
    utils.bars = []  # instrumentation: every ProgressBar created, in order

    def set_progress_bar_global_hook(function) -> None:
        """Mirrors ``comfy.utils.set_progress_bar_global_hook``: bars created afterwards report to it."""
        utils.PROGRESS_BAR_HOOK = function

    class ProgressBar:
        """Mirrors ``comfy.utils.ProgressBar``.

        The bar takes the global hook when it is created; ``update_absolute`` clamps the value to the
        total and calls the hook at once for the first and the final value, otherwise only when at
        least 0.1 s and 0.5 % have passed since the last call (ComfyUI's throttling). ``updates``
        records every ``update_absolute`` call (instrumentation, not in ComfyUI).
        """

        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.hook = utils.PROGRESS_BAR_HOOK
            self.node_id = node_id
            self._last_update_time = 0.0
            self._last_sent_value = -1
            self.updates: list[tuple[int, int]] = []
            utils.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total))
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            if self.hook is None:
                return
            now = time.perf_counter()
            if preview is not None or self._last_sent_value < 0 or value >= self.total:
                send = True
            else:
                changed = (value - max(0, self._last_sent_value)) / self.total * 100 if self.total > 0 else 100
                send = (
                    now - self._last_update_time >= utils.PROGRESS_THROTTLE_MIN_INTERVAL
                    and changed >= utils.PROGRESS_THROTTLE_MIN_PERCENT
                )
            if send:
                self.hook(self.current, self.total, preview, node_id=self.node_id)
                self._last_update_time = now
                self._last_sent_value = value

    utils.set_progress_bar_global_hook = set_progress_bar_global_hook
    utils.ProgressBar = ProgressBar
    return utils


# --------------------------------------------------------------------------------------------------
# comfy.model_management
# --------------------------------------------------------------------------------------------------


def _model_management_module() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.interrupt_processing = False
    mm.interrupt_processing_mutex = threading.RLock()
    mm.soft_empty_cache_calls = 0  # instrumentation

    class InterruptProcessingException(BaseException):
        """Mirrors ``comfy.model_management.InterruptProcessingException``: a BaseException, so
        ``except Exception`` does not catch it."""

    def interrupt_current_processing(value=True) -> None:
        """Mirrors ``interrupt_current_processing``: sets the module's interrupt flag (what Cancel does)."""
        with mm.interrupt_processing_mutex:
            mm.interrupt_processing = value

    def processing_interrupted() -> bool:
        """Mirrors ``processing_interrupted``."""
        with mm.interrupt_processing_mutex:
            return mm.interrupt_processing

    def throw_exception_if_processing_interrupted() -> None:
        """Mirrors ``throw_exception_if_processing_interrupted``: clears the flag, then raises."""
        with mm.interrupt_processing_mutex:
            if mm.interrupt_processing:
                mm.interrupt_processing = False
                raise InterruptProcessingException()

    def get_torch_device() -> torch.device:
        """Mirrors ``get_torch_device`` of a ComfyUI started with ``--cpu`` (``CPUState.CPU``)."""
        return torch.device("cpu")

    def soft_empty_cache(force=False) -> None:
        """Mirrors ``soft_empty_cache`` in CPU mode (returns at once); counts the calls."""
        mm.soft_empty_cache_calls += 1

    for function in (
        interrupt_current_processing,
        processing_interrupted,
        throw_exception_if_processing_interrupted,
        get_torch_device,
        soft_empty_cache,
    ):
        setattr(mm, function.__name__, function)
    mm.InterruptProcessingException = InterruptProcessingException
    return mm


# --------------------------------------------------------------------------------------------------
# comfy.lora
# --------------------------------------------------------------------------------------------------


def _lora_module() -> types.ModuleType:
    lora = types.ModuleType("comfy.lora")

    def calculate_weight(patches: list, weight: torch.Tensor, key: str, intermediate_dtype=torch.float32):
        """Mirrors ``comfy.lora.calculate_weight`` for "diff" patches (the only kind the tests make):
        per patch ``(strength, (diff,), strength_model, None, None)`` (what ``add_patches`` makes),
        ``weight *= strength_model`` then ``weight += strength * diff``, in place; a diff of another
        shape is skipped (ComfyUI warns)."""
        for strength, (diff,), strength_model, _, _ in patches:
            weight *= strength_model
            if strength != 0.0 and diff.shape == weight.shape:
                weight += strength * diff.to(weight.device, weight.dtype)
        return weight

    lora.calculate_weight = calculate_weight
    return lora


# --------------------------------------------------------------------------------------------------
# comfy.cli_args, comfy.sd
# --------------------------------------------------------------------------------------------------


def _cli_args_module() -> types.ModuleType:
    """Mirrors ``comfy.cli_args.args`` (argparse defaults: ``--disable-metadata`` off)."""
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = argparse.Namespace(disable_metadata=False)
    return cli_args


def _sd_module() -> types.ModuleType:
    sd = types.ModuleType("comfy.sd")
    sd.calls = []  # instrumentation: (function name, arguments)
    sd.detectable = True  # set False to act like a state dict whose model type ComfyUI does not know

    def load_diffusion_model_state_dict(sd_, model_options={}, metadata=None, disable_dynamic=False):  # noqa: B006
        """Mirrors ``comfy.sd.load_diffusion_model_state_dict``'s interface: returns a model, or None when
        the model type cannot be detected. Instead of building a model it records what it got."""
        sd.calls.append(("load_diffusion_model_state_dict", {"sd": sd_, "metadata": metadata}))
        if not sd.detectable:
            return None
        return types.SimpleNamespace(kind="ModelPatcher", state_dict=sd_, metadata=metadata)

    def load_diffusion_model(unet_path, model_options={}, disable_dynamic=False):  # noqa: B006
        """Mirrors ``comfy.sd.load_diffusion_model``: reads the file with its metadata, hands the state
        dict to ``load_diffusion_model_state_dict`` and raises when the type is not detected."""
        import safetensors

        sd.calls.append(("load_diffusion_model", {"path": unet_path}))
        with safetensors.safe_open(unet_path, framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
            metadata = file.metadata()
        model = load_diffusion_model_state_dict(tensors, model_options=model_options, metadata=metadata)
        if model is None:
            raise RuntimeError(f"ERROR: Could not detect model type of: {unet_path}")
        return model

    sd.load_diffusion_model_state_dict = load_diffusion_model_state_dict
    sd.load_diffusion_model = load_diffusion_model
    return sd


def _patcher_extension_module() -> types.ModuleType:
    """Mirrors ``comfy.patcher_extension`` in the parts used: wrapper types and ``WrapperExecutor``."""
    extension = types.ModuleType("comfy.patcher_extension")

    class WrappersMP:
        APPLY_MODEL = "apply_model"

    class WrapperExecutor:
        """Mirrors ``comfy.patcher_extension.WrapperExecutor``: ``execute`` calls the first wrapper as
        ``wrapper(executor, *args)``; calling the executor it got runs the next wrapper, and after the
        last one the original function. ``class_obj`` is the object the original belongs to."""

        def __init__(self, original, class_obj, wrappers: list, idx: int):
            self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers.copy(), idx

        def __call__(self, *args, **kwargs):
            return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

        def execute(self, *args, **kwargs):
            if self.idx == len(self.wrappers):
                return self.original(*args, **kwargs)
            return self.wrappers[self.idx](self, *args, **kwargs)

        @classmethod
        def new_class_executor(cls, original, class_obj, wrappers: list, idx=0):
            return cls(original, class_obj, wrappers, idx)

    def get_all_wrappers(wrapper_type: str, transformer_options: dict) -> list:
        """Mirrors ``get_all_wrappers``: every key's wrappers of the type, in insertion order."""
        wrappers = transformer_options.get("wrappers", {})
        return [w for group in wrappers.get(wrapper_type, {}).values() for w in group]

    extension.WrappersMP = WrappersMP
    extension.WrapperExecutor = WrapperExecutor
    extension.get_all_wrappers = get_all_wrappers
    return extension


# --------------------------------------------------------------------------------------------------
# folder_paths
# --------------------------------------------------------------------------------------------------

SUPPORTED_PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def _folder_paths_module(models_dir: Path) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.supported_pt_extensions = set(SUPPORTED_PT_EXTENSIONS)
    fp.models_dir = str(models_dir)
    # ComfyUI's defaults: the first folder of each kind is where files are saved.
    fp.folder_names_and_paths = {
        "checkpoints": ([str(models_dir / "checkpoints")], fp.supported_pt_extensions),
        "text_encoders": (
            [str(models_dir / "text_encoders"), str(models_dir / "clip")],
            fp.supported_pt_extensions,
        ),
        "diffusion_models": (
            [str(models_dir / "unet"), str(models_dir / "diffusion_models")],
            fp.supported_pt_extensions,
        ),
    }

    def add_model_folder_path(folder_name: str, full_folder_path: str) -> None:
        """Mirrors ``folder_paths.add_model_folder_path`` (not as default): a new kind gets no extension
        filter (every file is listed); the folder is appended to the kind's list once."""
        paths = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))[0]
        if full_folder_path not in paths:
            paths.append(full_folder_path)

    def get_folder_paths(folder_name: str) -> list[str]:
        """Mirrors ``folder_paths.get_folder_paths``: a copy of the folder list."""
        return list(fp.folder_names_and_paths[folder_name][0])

    def _walk(directory: str) -> list[str]:
        if not os.path.isdir(directory):
            return []
        found = []
        for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
            subdirs[:] = [d for d in subdirs if d != ".git"]
            found += [os.path.relpath(os.path.join(dirpath, name), directory) for name in filenames]
        return found

    def get_filename_list(folder_name: str) -> list[str]:
        """Mirrors ``folder_paths.get_filename_list``: every file below each folder of the kind, as a
        path relative to its folder, kept when its (lower-cased) extension is supported, sorted.
        ComfyUI caches the list until a folder's mtime changes; the double always walks."""
        folders, extensions = fp.folder_names_and_paths[folder_name]
        names = set()
        for folder in folders:
            names.update(
                name for name in _walk(folder) if not extensions or os.path.splitext(name)[-1].lower() in extensions
            )
        return sorted(names)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        """Mirrors ``folder_paths.get_full_path``: the name is made relative to '/' first (so '..' cannot
        climb out), then the first folder holding such a file wins."""
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in fp.folder_names_and_paths[folder_name][0]:
            candidate = os.path.join(folder, filename)
            if os.path.isfile(candidate):
                return candidate
        return None

    def get_full_path_or_raise(folder_name: str, filename: str) -> str:
        """Mirrors ``folder_paths.get_full_path_or_raise``: FileNotFoundError naming folder and file."""
        full_path = get_full_path(folder_name, filename)
        if full_path is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return full_path

    def is_within_directory(directory: str, target: str) -> bool:
        """Mirrors ``folder_paths.is_within_directory``: real paths (symlinks resolved)."""
        directory = os.path.realpath(directory)
        return os.path.commonpath((directory, os.path.realpath(target))) == directory

    def _expand_variables(prefix: str, width: int, height: int) -> str:
        now = time.localtime()
        values = {
            "width": width,
            "height": height,
            "year": now.tm_year,
            "month": f"{now.tm_mon:02}",
            "day": f"{now.tm_mday:02}",
            "hour": f"{now.tm_hour:02}",
            "minute": f"{now.tm_min:02}",
            "second": f"{now.tm_sec:02}",
        }
        for key, value in values.items():
            prefix = prefix.replace(f"%{key}%", str(value))
        return prefix

    def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0):
        """Mirrors ``folder_paths.get_save_image_path``.

        Expands ``%year%``-style variables, splits the normalised prefix into subfolder and base
        name, raises a bare ``Exception`` when the subfolder is not inside ``output_dir``, and
        numbers the file one above the highest ``<base>_NNNNN…`` already in the folder (1 when
        none, creating the folder when it does not exist). Returns (folder, base name, counter,
        subfolder, prefix).
        """
        if "%" in filename_prefix:
            filename_prefix = _expand_variables(filename_prefix, image_width, image_height)
        normalised = os.path.normpath(filename_prefix)
        subfolder, filename = os.path.dirname(normalised), os.path.basename(normalised)
        full_output_folder = os.path.join(output_dir, subfolder)
        if not is_within_directory(output_dir, full_output_folder):
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(full_output_folder)}\n         output_dir: {output_dir}"
            )
        base_length = len(os.path.basename(filename_prefix))

        def number(existing: str) -> tuple[int, str]:
            head = existing[: base_length + 1]
            try:
                digits = int(existing[base_length + 1 :].split(".")[0].split("_")[0])
            except ValueError:
                digits = 0
            return digits, head

        try:
            numbered = [
                digits
                for digits, head in map(number, os.listdir(full_output_folder))
                if os.path.normcase(head[:-1]) == os.path.normcase(filename) and head[-1:] == "_"
            ]
            counter = max(numbered) + 1 if numbered else 1
        except FileNotFoundError:
            os.makedirs(full_output_folder, exist_ok=True)
            counter = 1
        return full_output_folder, filename, counter, subfolder, filename_prefix

    for function in (
        add_model_folder_path,
        get_folder_paths,
        get_filename_list,
        get_full_path,
        get_full_path_or_raise,
        is_within_directory,
        get_save_image_path,
    ):
        setattr(fp, function.__name__, function)
    return fp


# --------------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------------


def _server_module() -> types.ModuleType:
    server = types.ModuleType("server")

    class PromptServer:
        """Mirrors ``server.PromptServer``: the running server is ``PromptServer.instance``.

        ``client_id`` is the browser that queued the running prompt (None until one does);
        ``send_sync(event, data, sid=None)`` queues a message for that ``sid`` (every browser when
        None); here it is appended to ``messages`` and handed to each function in ``listeners``
        (instrumentation)."""

        instance = None

        def __init__(self):
            self.client_id = None
            self.messages: list[tuple[str, dict, Any]] = []
            self.listeners: list = []
            PromptServer.instance = self

        def send_sync(self, event, data, sid=None):
            self.messages.append((event, json.loads(json.dumps(data)), sid))  # must be JSON-serialisable
            for listener in list(self.listeners):
                listener(event, data)

        def send_progress_text(self, text, node_id, sid=None):
            self.messages.append(("progress_text", {"text": text, "node": node_id}, sid))

        def events(self, name: str) -> list[dict]:
            return [data for event, data, _ in self.messages if event == name]

    server.PromptServer = PromptServer
    return server


# --------------------------------------------------------------------------------------------------
# A loaded MODEL: comfy.model_patcher.ModelPatcher and comfy-kitchen's QuantizedTensor
# --------------------------------------------------------------------------------------------------


class QuantizedTensor(torch.Tensor):
    """Stands for comfy-kitchen's ``QuantizedTensor`` (what ComfyUI's mixed-precision ops hold): fp8
    data, ``_params`` with ``scale`` and ``orig_dtype``, and ``dequantize()`` giving
    ``data * scale`` in ``orig_dtype``. ``_params`` survives what torch makes of it (the Parameter
    a module holds, ``detach``)."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: float, orig_dtype: torch.dtype):
        self = torch.Tensor._make_subclass(cls, qdata)
        self._params = types.SimpleNamespace(scale=scale, orig_dtype=orig_dtype)
        return self

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        result = super().__torch_function__(func, types_, args, kwargs or {})
        if isinstance(result, cls) and "_params" not in result.__dict__:
            source = next((a for a in args if isinstance(a, cls) and "_params" in a.__dict__), None)
            if source is not None:
                result._params = source._params
        return result

    @classmethod
    def from_float(cls, weight: torch.Tensor, fp8_dtype=torch.float8_e4m3fn) -> QuantizedTensor:
        scale = float(weight.float().abs().max()) / torch.finfo(fp8_dtype).max
        return cls((weight.float() / scale).to(fp8_dtype), scale, weight.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.as_subclass(torch.Tensor).float() * self._params.scale).to(self._params.orig_dtype)

    def state_dict(self, key: str) -> dict[str, torch.Tensor]:
        """Like comfy-kitchen's: the plain fp8 data under ``key`` and the scale under ``key + "_scale"``."""
        return {key: self.as_subclass(torch.Tensor), key + "_scale": torch.tensor(self._params.scale)}


class QuantizedLinear(torch.nn.Module):
    """Mirrors a Linear of ComfyUI's ``comfy.ops.mixed_precision_ops`` holding an fp8 weight: it is no
    ``torch.nn.Linear``, ``weight`` is a (frozen) QuantizedTensor, and its ``state_dict`` is the file
    layout (``_quantized_weight_state_dict``): ``bias``, the weight's ``state_dict`` (plain fp8
    ``weight`` and ``weight_scale``) and a uint8 JSON ``comfy_quant``; the scale and the JSON are no
    module attributes."""

    def __init__(self, weight, bias: torch.Tensor | None, quant_format: str = "float8_e4m3fn"):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.quant_format = quant_format

    def state_dict(self, *args, destination=None, prefix="", **kwargs):
        sd = destination if destination is not None else {}
        if self.bias is not None:
            sd[f"{prefix}bias"] = self.bias
        sd.update(self.weight.state_dict(f"{prefix}weight"))
        conf = json.dumps({"format": self.quant_format}).encode("utf-8")
        sd[f"{prefix}comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        return sd


class ModelPatcher:
    """Mirrors ``comfy.model_patcher.ModelPatcher`` in the parts the model source reads and the load
    states these tests put it in (``tests/comfyui/test_model_source.py`` reaches them with real ComfyUI).

    * ``patches[key]`` is a list of ``(strength_patch, patch, strength_model, offset, function)``
      (``add_patches``); a patch ``(diff,)`` is ComfyUI's "diff" patch.
    * ``model_state_dict(filter_prefix)`` is the model's ``state_dict()`` without the keys outside
      the prefix.
    * ``load()`` and ``partially_unload()`` mirror the load states of ``ModelPatcher.load`` (full, lowvram,
      lowvram with ``force_patch_weights``) and of a partial unload; ``backup`` holds ComfyUI's
      ``(weight, inplace_update)`` named tuple of each weight patched in place.
    * ``add_weight_wrapper`` registers a training adapter's weight wrapper; ``clone`` and
      ``add_wrapper_with_key`` keep the ``APPLY_MODEL`` wrappers per clone.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.patches: dict[str, list] = {}
        self.backup: dict[str, Backup] = {}
        self.hook_backup: dict[str, tuple[torch.Tensor, torch.device]] = {}
        self.weight_wrapper_patches: dict[str, list] = {}
        self.wrappers: dict[str, dict[str, list]] = {}

    def clone(self) -> ModelPatcher:
        """Mirrors ``ModelPatcher.clone``: the same torch model and backup, copies of the patch lists
        and of the wrapper lists, so what is added to the clone does not reach this patcher."""
        clone = ModelPatcher(self.model)
        clone.patches = {key: patches[:] for key, patches in self.patches.items()}
        clone.backup = self.backup
        clone.wrappers = {kind: {key: w[:] for key, w in group.items()} for kind, group in self.wrappers.items()}
        return clone

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper) -> None:
        """Mirrors ``ModelPatcher.add_wrapper_with_key``."""
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def add_patches(self, patches: dict, strength_patch=1.0, strength_model=1.0) -> list:
        state = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in state:
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
                added.append(key)
        return added

    def add_weight_wrapper(self, name: str, function) -> None:
        """Mirrors ``ModelPatcher.add_weight_wrapper``: ``function(weight)`` runs at every forward."""
        self.weight_wrapper_patches.setdefault(name, []).append(function)

    def model_state_dict(self, filter_prefix=None) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if filter_prefix is not None:
            for key in list(state):
                if not key.startswith(filter_prefix):
                    state.pop(key)
        return state

    def _set(self, key: str, value: torch.Tensor) -> None:
        """Mirrors ``comfy.utils.set_attr_param``: the attribute becomes a frozen Parameter."""
        module_path, _, name = key.rpartition(".")
        setattr(self.model.get_submodule(module_path), name, torch.nn.Parameter(value, requires_grad=False))

    def _patch_in_place(self, key: str) -> None:
        """Mirrors ``patch_weight_to_device(key)`` on a CPU: an unpatched key stays as it is; a patched
        weight is backed up, patched in float32 (``lora_compute_dtype``) by ``comfy.lora.calculate_weight``
        and cast back (``stochastic_rounding`` is a plain cast for bf16/fp16/fp32) onto the model."""
        import comfy.lora

        if key not in self.patches:
            return
        weight = self.model.get_parameter(key)
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise NotImplementedError("the double does not mirror stochastic rounding to fp8")
        self.backup.setdefault(key, Backup(weight, False))
        patched = comfy.lora.calculate_weight(self.patches[key], weight.to(torch.float32, copy=True), key)
        self._set(key, patched.to(weight.dtype))

    def _modules(self):
        for name, module in self.model.named_modules():
            params = [p for p, _ in module.named_parameters(recurse=False)]
            if params:
                yield module, [f"{name}.{param}" if name else param for param in params]

    def load(self, offloaded=(), force_patch_weights=False) -> None:
        """Mirrors ``ModelPatcher.load``: modules named in ``offloaded`` stay lowvram (their patches go
        into ``weight_function`` as ``LowVramPatch``es, applied at forward time), unless
        ``force_patch_weights``, which patches them in place *without* marking them; every other
        module is patched in place and marked ``comfy_patched_weights = True``."""
        for module, keys in self._modules():
            name = keys[0].rpartition(".")[0]
            if name in offloaded:
                patched = [LowVramPatch(k, self.patches) for k in keys if k in self.patches]
                module.weight_function = [] if force_patch_weights else patched
            if name not in offloaded or force_patch_weights:
                for key in keys:
                    self._patch_in_place(key)
            if name not in offloaded:
                module.comfy_patched_weights = True

    def partially_unload(self, names=()) -> None:
        """Mirrors ``ModelPatcher.partially_unload`` for the modules named: the backup goes back onto a
        patched module, which becomes lowvram (``LowVramPatch``) with ``comfy_patched_weights = False``."""
        for module, keys in self._modules():
            if keys[0].rpartition(".")[0] not in names or not getattr(module, "comfy_patched_weights", False):
                continue
            for key in keys:
                if key in self.backup:
                    self._set(key, self.backup.pop(key).weight)
            module.weight_function = [LowVramPatch(k, self.patches) for k in keys if k in self.patches]
            module.comfy_patched_weights = False


Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ComfyUI's backup entry


class LowVramPatch:
    """Mirrors ``comfy.model_patcher.LowVramPatch``: applies ``patches[key]`` to a weight at forward time."""

    def __init__(self, key: str, patches: dict):
        self.key, self.patches = key, patches

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches[self.key], weight, self.key, intermediate_dtype=weight.dtype)


def apply_model(patcher: ModelPatcher, forward, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mirrors how a sampling step of ``comfy.samplers`` reaches ``BaseModel.apply_model``:
    ``sampler_helpers.prepare_model_patcher`` merges the patcher's wrappers into
    ``transformer_options["wrappers"]``, and ``apply_model`` runs the ``APPLY_MODEL`` ones around
    ``_apply_model`` with the BaseModel (``patcher.model``) as ``class_obj``, passing
    ``(x, t, c_concat, c_crossattn, control, transformer_options)``. ``forward(diffusion_model, x)``
    stands for ``_apply_model``."""
    import comfy.patcher_extension as extension

    transformer_options = {"wrappers": {kind: dict(group) for kind, group in patcher.wrappers.items()}}
    base = patcher.model

    def _apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None):
        return forward(base.diffusion_model, x)

    wrappers = extension.get_all_wrappers(extension.WrappersMP.APPLY_MODEL, transformer_options)
    executor = extension.WrapperExecutor.new_class_executor(_apply_model, base, wrappers)
    return executor.execute(x, t, None, None, None, transformer_options)


# --------------------------------------------------------------------------------------------------
# main.py's progress hook and the whole set
# --------------------------------------------------------------------------------------------------


def server_progress_hook(model_management: types.ModuleType, record: list):
    """Mirrors the hook ``main.py`` (``hijack_progress``) installs: every reported progress value first
    checks for an interrupt, then is sent to the browser (here: appended to ``record``)."""

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        model_management.throw_exception_if_processing_interrupted()
        record.append({"value": value, "max": total, "node": node_id})

    return hook


def build(models_dir: Path) -> types.SimpleNamespace:
    """A fresh set of double modules rooted at ``models_dir``; ``modules`` maps the names to install."""
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, as ComfyUI's is
    utils = _utils_module()
    model_management = _model_management_module()
    cli_args = _cli_args_module()
    sd = _sd_module()
    patcher_extension = _patcher_extension_module()
    lora = _lora_module()
    comfy.utils, comfy.model_management, comfy.cli_args, comfy.sd = utils, model_management, cli_args, sd
    comfy.lora = lora
    comfy.patcher_extension = patcher_extension
    folder_paths = _folder_paths_module(models_dir)
    server = _server_module()
    hook_calls: list[dict] = []
    utils.set_progress_bar_global_hook(server_progress_hook(model_management, hook_calls))
    prompt_server = server.PromptServer()
    prompt_server.client_id = "client-1"  # a prompt queued from a browser is running
    return types.SimpleNamespace(
        modules={
            "comfy": comfy,
            "comfy.utils": utils,
            "comfy.model_management": model_management,
            "comfy.cli_args": cli_args,
            "comfy.sd": sd,
            "comfy.patcher_extension": patcher_extension,
            "comfy.lora": lora,
            "folder_paths": folder_paths,
            "server": server,
        },
        utils=utils,
        model_management=model_management,
        cli_args=cli_args,
        sd=sd,
        folder_paths=folder_paths,
        server=prompt_server,
        hook_calls=hook_calls,
        InterruptProcessingException=model_management.InterruptProcessingException,
    )
