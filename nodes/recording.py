"""Recording calibration statistics while ComfyUI samples or encodes prompts, free of the node API.

A ``RecordingSession`` is an ``APPLY_MODEL`` wrapper (``host.wrap_apply_model``): for the duration of
each call it hooks the diffusion model's Linear-like layers and feeds their inputs to one
``quant_core.calibration.Recorder``, which accumulates across calls until ``save``. The Recorder
does not hook the real layers itself: those modules are shared by every clone of the MODEL, and
hooks left on them would also record the input MODEL and other branches of the graph. It hooks
*taps* instead: a module tree that mirrors the layers' paths and weight shapes (with no weight
data), so its statistics carry the names ``ModelSource`` gives the weights — the paths below
``diffusion_model.`` — and the file converts the same MODEL or its diffusion-models file.

The same session records a CLIP's text encoders (``host.wrap_text_encoder``: every prompt encoding of
the CLIP clone), naming each layer as its ``text_encoders/`` file does: the path below the encoder's
``transformer`` module (``encoder.block.3.layer.1.DenseReluDense.wo``, ``model.layers.7.mlp.up_proj``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from ..quant_core.calibration import Recorder, linear_like
from ..quant_core.policy import LayerPolicy, block_prefixes, detect_preset
from . import host

WRAPPER_KEY = "fp8_scaled_record"
MIB = 2**20


class _Tap(torch.nn.Module):
    """Stands for one Linear-like layer: same weight shape (a 1-element view, no data), fed its inputs."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.weight = torch.empty(1).expand(shape)
        self.out_features, self.in_features = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _quantized_by_default(model: torch.nn.Module):
    """Whether the converter, at its default settings, quantizes a layer: the model's preset keeps
    e.g. embedders and final layers in full precision, and statistics for them would only cost
    memory (a layer's dtype is checked when converting, not here)."""
    names = [name for name, _ in model.named_parameters()]
    policy = LayerPolicy(detect_preset(names), blocks=block_prefixes(names))

    def wanted(path: str, module: torch.nn.Module) -> bool:
        return policy.decide(f"{path}.weight", torch.float32, tuple(module.weight.shape)).quantize

    return wanted


def diffusion_layers(diffusion_model: torch.nn.Module, all_layers: bool) -> dict[str, str]:
    """Module path -> recorded name of each Linear-like layer to record (the name is the path)."""
    wanted = (lambda path, module: True) if all_layers else _quantized_by_default(diffusion_model)
    return {
        path: path
        for path, module in diffusion_model.named_modules()
        if path and linear_like(module) and wanted(path, module)
    }


def text_encoder_layers(cond_stage_model: torch.nn.Module, all_layers: bool) -> dict[str, str]:
    """Module path -> recorded name for every text encoder of a CLIP (SD3's has three): the name is the
    path below the encoder's ``transformer``, as the keys of its ``text_encoders/`` file."""
    layers: dict[str, str] = {}
    encoders: list[str] = []
    for path, module in cond_stage_model.named_modules():
        inside = any(path.startswith(f"{encoder}.") for encoder in encoders)  # a "transformer" within one
        if path.rsplit(".", 1)[-1] == "transformer" and not inside:
            encoders.append(path)
            layers.update({f"{path}.{inner}": name for inner, name in diffusion_layers(module, all_layers).items()})
    return layers


def _tap_tree(model: torch.nn.Module, layers: dict[str, str]) -> tuple[torch.nn.Module, dict[str, _Tap]]:
    """A module tree with a tap at the recorded name of every layer, and the taps by name."""
    modules = dict(model.named_modules())
    root = torch.nn.Module()
    taps: dict[str, _Tap] = {}
    for path, name in layers.items():
        *parents, leaf = name.split(".")
        owner = root
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        taps[name] = _Tap(modules[path].weight.shape)
        owner.add_module(leaf, taps[name])
    return root, taps


@dataclass
class RecordingReport:
    """What one saved recording holds, for the Save node's text."""

    path: str
    layers: int
    over_cap: list[str]  # left out because the memory cap was reached
    calls: int
    rows: int
    nbytes: int
    kept: bool  # the recording goes on (memory still held) instead of being freed

    def text(self) -> str:
        after = "held: recording goes on" if self.kept else "freed now"
        lines = [
            f"saved     {self.path}",
            f"layers    {self.layers} recorded",
            f"samples   {self.calls} model calls on {self.rows} batch rows",
            f"memory    {self.nbytes / MIB:.1f} MiB ({after})",
        ]
        if self.over_cap:
            lines.append(f"skipped   {len(self.over_cap)} layers over the memory cap, e.g. {self.over_cap[0]}")
        return "\n".join(lines)


class RecordingSession:
    """Accumulates the statistics of every sampling run of one recording MODEL until they are saved.

    The Recorder's memory per layer depends on the layer's width, not on how much is sampled (exact
    statistics for narrow layers, a sketch for wide ones); ``max_bytes`` bounds the total: once the
    Recorder holds that much, layers seen for the first time are not recorded any more (layers
    already recorded go on accumulating in the memory they have), so at most one layer's
    statistics go past the cap.
    """

    def __init__(self, max_bytes: int, node_id: str | None = None, all_layers: bool = False, select=diffusion_layers):
        self.max_bytes = max_bytes
        self.node_id = node_id
        self.all_layers = all_layers
        self.select = select  # the layers to record: diffusion_layers or text_encoder_layers
        self._lock = threading.Lock()  # ComfyUI's multi-GPU sampling calls the model from several threads
        self._start()

    def _start(self) -> None:
        self.recorder: Recorder | None = None
        self._layers: dict[str, str] = {}  # module path -> recorded name
        self._taps: dict[str, _Tap] = {}
        self._fed: set[str] = set()
        self._over_cap: set[str] = set()
        self.calls = 0
        self.rows = 0

    def __call__(self, executor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The APPLY_MODEL wrapper: record while the clone's diffusion model runs."""
        return self.record(executor.class_obj.diffusion_model, lambda: executor(x, *args, **kwargs), x.shape[0])

    def record(self, model: torch.nn.Module, run, rows: int = 1):
        """Hook ``model``'s layers, ``run()``, unhook; counts one call on ``rows`` batch rows."""
        handles = self._hook(model)
        try:
            output = run()
        finally:
            for handle in handles:
                handle.remove()
        with self._lock:
            self.calls += 1
            self.rows += rows
        host.progress_text(self.node_id, self.status())
        return output

    def _hook(self, model: torch.nn.Module) -> list:
        with self._lock:
            if self.recorder is None:
                self._layers = self.select(model, self.all_layers)
                root, self._taps = _tap_tree(model, self._layers)
                self.recorder = Recorder(root)
        return [
            module.register_forward_hook(self._feeder(self._layers[path]))
            for path, module in model.named_modules()
            if path in self._layers
        ]

    def _feeder(self, name: str):
        tap = self._taps[name]

        def feed(module, inputs, output) -> None:
            host.check_interrupt()  # per layer: recording makes each model call slower than sampling checks for
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[-1] != tap.in_features:
                return  # not called as a Linear: the Recorder would ignore it too
            with self._lock:
                if name in self._over_cap:
                    return
                if name not in self._fed:
                    if self.recorder.nbytes >= self.max_bytes:
                        self._over_cap.add(name)
                        logging.warning("FP8 calibration: memory cap reached, %s is not recorded", name)
                        return
                    self._fed.add(name)
                tap(inputs[0])

        return feed

    @property
    def nbytes(self) -> int:
        return self.recorder.nbytes if self.recorder else 0

    def status(self) -> str:
        """One line for the Record node while sampling runs."""
        return (
            f"recording: {self.calls} model calls, {len(self._fed)} layers, "
            f"{self.nbytes / MIB:.1f} of {self.max_bytes / MIB:.0f} MiB"
        )

    def save(self, path: str | os.PathLike, keep: bool = False) -> RecordingReport:
        """Write what was recorded since the last freeing save. Then free it, so the next sampling run
        starts anew, or with ``keep`` go on accumulating (for queued runs over many prompts)."""
        if not self._fed:
            raise host.UserError(
                "nothing was recorded since the last save: sample with the MODEL output of 'Record FP8 "
                "Calibration', or encode prompts with the CLIP output of 'Record FP8 Text Encoder Calibration' "
                "(a cached node does not run again: change its seed or prompt; CLIP-L/G have no layers to record, "
                "the converter keeps them whole)"
            )
        self.recorder.save(path, step=lambda *_: host.check_interrupt())  # a factor per layer: seconds in all
        report = RecordingReport(
            str(path), len(self._fed), sorted(self._over_cap), self.calls, self.rows, self.recorder.nbytes, keep
        )
        if not keep:
            self.recorder.close()
            self._start()
        return report


def record_model(
    model, max_mib: int, node_id: str | None = None, all_layers: bool = False
) -> tuple[object, RecordingSession]:
    """A clone of ``model`` whose sampling runs are recorded, and the session that holds the recording."""
    session = RecordingSession(max_mib * MIB, node_id, all_layers)
    return host.wrap_apply_model(model, WRAPPER_KEY, session), session


def record_text_encoder(
    clip, max_mib: int, node_id: str | None = None, all_layers: bool = False
) -> tuple[object, RecordingSession]:
    """A clone of ``clip`` whose prompt encodings are recorded, and the session that holds the recording."""
    session = RecordingSession(max_mib * MIB, node_id, all_layers, text_encoder_layers)
    return host.wrap_text_encoder(clip, session.record), session


def save_recording(session: RecordingSession, filename_prefix: str, keep: bool = False) -> RecordingReport:
    """Save the session into the calibration folder, numbered like ComfyUI's save nodes."""
    return session.save(host.calibration_save_path(filename_prefix), keep)
