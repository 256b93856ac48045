"""Everything the nodes ask of the running ComfyUI, in one place.

ComfyUI's runtime modules (``comfy.utils``, ``comfy.model_management``, ``comfy.lora``, ``comfy.sd``,
``folder_paths``, ``server``) are imported lazily inside each function: the pack must import without them, and
the unit tests replace exactly these modules with doubles that behave like ComfyUI's own.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

EVENT_PREFIX = "fp8_scaled"
SOURCE_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")
CALIBRATION_FOLDER = "fp8_calibration"  # models/fp8_calibration: files written by "Save FP8 Calibration"
NO_CALIBRATION = "none"
NO_SOURCE = "none"  # Inspect's source when the file comes from its 'path' input
_SAFE_PREFIX = re.compile(r"^[\w\-. /%]+$")


class UserError(ValueError):
    """An expected problem the user can fix (bad prefix, missing file): shown as a plain message."""


def torch_device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def free_memory() -> None:
    """Give cached GPU memory back after a conversion (a no-op on the CPU)."""
    import comfy.model_management

    comfy.model_management.soft_empty_cache()


def calculate_weight(patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` (float32, modified in place) with a ModelPatcher's ``patches`` for ``key`` applied,
    by ComfyUI's own patch arithmetic (LoRA, LoHa, diff, set…)."""
    import comfy.lora

    return comfy.lora.calculate_weight(patches, weight, key)


def load_diffusion_model(path: Path):
    """ComfyUI's own loader on a file it reads as it is (a ModelPatcher)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(path))


def load_diffusion_state(state: dict[str, torch.Tensor], metadata: dict[str, str]):
    """ComfyUI's own loader on tensors already in memory; None when it cannot tell the model type."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(state, metadata=metadata)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception (a BaseException) if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def send(event: str, data: dict) -> None:
    """A namespaced message to the web extension; silently skipped without a running server."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:  # to the browser that queued the prompt, as ComfyUI's own progress messages
        server.send_sync(f"{EVENT_PREFIX}.{event}", data, getattr(server, "client_id", None))


def progress_text(node_id: str | None, text: str) -> None:
    """Text shown on a node while the prompt runs (no web extension needed); skipped without a server."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id, getattr(server, "client_id", None))


def wrap_apply_model(model, key: str, wrapper):
    """A clone of the ModelPatcher whose every ``apply_model`` call runs through ``wrapper``.

    ComfyUI's ``APPLY_MODEL`` wrappers are kept per clone, so the input MODEL and other branches of
    the graph are not wrapped; they are called as ``wrapper(executor, x, t, ...)``, with the
    ``BaseModel`` as ``executor.class_obj``.
    """
    import comfy.patcher_extension

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)
    return clone


def wrap_text_encoder(clip, record):
    """A clone of the CLIP whose every prompt encoding runs as ``record(cond_stage_model, encode)``.

    ComfyUI has no wrapper hook for text encoders, so the clone's two encode methods (the ones
    ``CLIPTextEncode`` and its relatives call) are replaced on the clone alone: the input CLIP and
    other branches of the graph are not recorded. ``encode_from_tokens_scheduled`` calls
    ``encode_from_tokens``; the nested call is not recorded twice.
    """
    clone = clip.clone()
    active = threading.local()

    def recorded(method):
        def encode(*args, **kwargs):
            if getattr(active, "on", False):
                return method(*args, **kwargs)
            active.on = True
            try:
                return record(clone.cond_stage_model, lambda: method(*args, **kwargs))
            finally:
                active.on = False

        return encode

    for name in ("encode_from_tokens_scheduled", "encode_from_tokens"):
        setattr(clone, name, recorded(getattr(clone, name)))
    return clone


def source_files() -> list[str]:
    """``folder/name`` entries of every .safetensors file in the folders the converter reads."""
    import folder_paths

    return [
        f"{folder}/{name}"
        for folder in SOURCE_FOLDERS
        for name in folder_paths.get_filename_list(folder)
        if name.lower().endswith(".safetensors")  # ComfyUI matches extensions case-insensitively
    ]


def resolve_source(entry: str) -> tuple[str, Path]:
    """``folder/name`` from ``source_files`` -> (folder, absolute path)."""
    import folder_paths

    folder, _, name = entry.partition("/")
    if folder not in SOURCE_FOLDERS or not name:
        raise UserError(f"pick a file from {', '.join(SOURCE_FOLDERS)}, not {entry!r}")
    try:
        return folder, Path(folder_paths.get_full_path_or_raise(folder, name))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def resolve_model_file(path: str) -> Path:
    """A path handed over by another node, accepted only inside the model folders the pack uses."""
    import folder_paths

    resolved = Path(path).resolve()
    roots = [Path(root).resolve() for folder in SOURCE_FOLDERS for root in folder_paths.get_folder_paths(folder)]
    if not any(resolved.is_relative_to(root) for root in roots) or not resolved.is_file():
        raise UserError(f"{path!r} is not a file inside the {', '.join(SOURCE_FOLDERS)} folders")
    return resolved


def calibration_folders() -> list[str]:
    """The calibration folders, registering ``models/fp8_calibration`` with ComfyUI on first use.

    Registered lazily (not at import) so the pack imports without ComfyUI; a folder already named in
    ``extra_model_paths.yaml`` stays first, which is where ComfyUI saves.
    """
    import folder_paths

    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        default = os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)
        folder_paths.add_model_folder_path(CALIBRATION_FOLDER, default)
    return folder_paths.get_folder_paths(CALIBRATION_FOLDER)


def calibration_files() -> list[str]:
    """The convert nodes' calibration choices: ``none`` and every .safetensors file in the folder."""
    import folder_paths

    calibration_folders()
    names = folder_paths.get_filename_list(CALIBRATION_FOLDER)  # the folder has no extension filter
    return [NO_CALIBRATION, *(name for name in names if name.lower().endswith(".safetensors"))]


def calibration_save_path(filename_prefix: str) -> Path:
    """Where "Save FP8 Calibration" writes: numbered in the first calibration folder."""
    calibration_folders()
    return save_path(filename_prefix, CALIBRATION_FOLDER)


def resolve_calibration(choice: str, path: str | None = None) -> Path | None:
    """The calibration file to convert with: a connected ``path`` (from "Save FP8 Calibration") wins
    over the dropdown; both are accepted only inside the calibration folders. None for ``none``."""
    import folder_paths

    roots = [Path(root).resolve() for root in calibration_folders()]
    if path:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots) or not resolved.is_file():
            raise UserError(f"{path!r} is not a file inside the {CALIBRATION_FOLDER} folder")
        return resolved
    if choice == NO_CALIBRATION:
        return None
    try:
        return Path(folder_paths.get_full_path_or_raise(CALIBRATION_FOLDER, choice))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def save_folder(folder: str, source: Path | None = None) -> str:
    """The model folder a converted file goes into: the one ``source`` was found in, if any; else
    the first one named like ``folder`` (``models/diffusion_models``, the name the user knows; ComfyUI
    lists ``models/unet`` first for diffusion models), else ComfyUI's first."""
    import folder_paths

    roots = folder_paths.get_folder_paths(folder)
    if source is not None:
        resolved = Path(source).resolve()
        for root in roots:
            if resolved.is_relative_to(Path(root).resolve()):
                return root
    return next((root for root in roots if Path(root).name == folder), roots[0])


def save_path(filename_prefix: str, folder: str, source: Path | None = None) -> Path:
    """``<folder>/<prefix>_NNNNN_.safetensors`` with ComfyUI's numbering, refusing to leave the folder;
    the folder is picked by ``save_folder``."""
    import folder_paths

    prefix = filename_prefix.strip()
    parts = Path(prefix).parts
    if not prefix or not _SAFE_PREFIX.match(prefix) or os.path.isabs(prefix) or any(p.startswith(".") for p in parts):
        raise UserError(
            f"filename_prefix {filename_prefix!r} must be a relative name made of letters, digits, "
            "'_', '-', '.', '/' and spaces, with no part starting with '.' (no '..', no hidden files)"
        )
    output_dir = save_folder(folder, source)
    try:
        full_folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, output_dir)
    except OSError as exc:
        raise UserError(f"cannot save with filename_prefix {filename_prefix!r}: {exc}") from exc
    except Exception as exc:  # ComfyUI raises a bare Exception for paths outside the folder
        raise UserError(f"filename_prefix {filename_prefix!r} points outside {output_dir}") from exc
    return Path(full_folder) / f"{filename}_{counter:05}_.safetensors"


def save_metadata(prompt: object, extra_pnginfo: object) -> dict[str, str]:
    """The workflow metadata ComfyUI's own save nodes write (unless metadata is disabled)."""
    try:
        from comfy.cli_args import args

        if args.disable_metadata:
            return {}
    except ImportError:
        pass
    metadata = {}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    return metadata


@dataclass
class NodeProgress:
    """Drives ComfyUI's progress bar and the web extension's live panel from the engine's reports:
    each finished tensor (``__call__``) and, every half second, the tensor being rounded
    (``activity``), so that a long tensor moves the bar, names itself and ticks elapsed time. The
    bar's position and the ETA are the engine's (``quant_core.estimate``): the share of the work done,
    and null until it has a basis."""

    node_id: str | None
    total: int
    started: float = field(default_factory=time.perf_counter)
    index: int = 0
    errors: list[float] = field(default_factory=list)
    quantized: int = 0

    def __post_init__(self) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(self.total, node_id=self.node_id)

    def __call__(self, report) -> None:
        self.index = report.index
        self.bar.update_absolute(self._position(report.share, 0.0), self.total)
        if report.quantized:
            self.quantized += 1
            self.errors.append(report.error_after)
        self._send(report.name, report.eta, report.share)

    def activity(self, activity) -> None:
        """A ``quant_core.job.Activity``: the tensor being rounded, or ``cancelling`` once the user cancelled."""
        fraction = activity.done / activity.total if activity.total else 0.0
        if not activity.cancelling:  # ComfyUI's bar hook checks for interrupts: not while stopping
            self.bar.update_absolute(self._position(activity.share, fraction), self.total)
        working = {
            "working": not activity.cancelling,
            "cancelling": activity.cancelling,
            "method": activity.method,
            "step": activity.done,
            "steps": activity.total,
            "unit": activity.unit,
            "tensor_seconds": round(activity.seconds, 2),
        }
        self._send(activity.name, activity.eta, activity.share, working)

    def _position(self, share: float | None, fraction: float) -> float:
        """Where the bar stands, out of ``total``: the engine's share of the work done (a large weight
        moves it more than a bias), or, with nothing to round, tensors and the current one's ``fraction``."""
        return round(share * self.total if share is not None else self.index + fraction, 3)

    def _send(self, tensor: str, eta: float | None, share: float | None, working: dict | None = None) -> None:
        send(
            "progress",
            {
                "node": self.node_id,
                "tensor": tensor,
                "index": self.index,
                "total": self.total,
                "quantized": self.quantized,
                "kept": self.index - self.quantized,
                "elapsed": round(time.perf_counter() - self.started, 2),
                "eta": None if eta is None else round(eta, 2),  # null: no basis yet ("estimating…")
                "share": share,  # of the work done, 0..1; null: nothing to round (count the tensors)
                "error": sum(self.errors) / len(self.errors) if self.errors else 0.0,
                **(working or {"working": False, "cancelling": False}),
            },
        )
