"""The conversion engine: plan the output from the header, then stream tensors through it.

``convert`` works on any ``TensorSource`` (a safetensors file, or a loaded model in the
ComfyUI nodes); ``convert_file`` is the file-to-file entry point used by the command line.
Work is done per *item*: one kept tensor, or one shared-scale group of weights that must be
scaled together. Peak memory is therefore a few of the largest tensors, never the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from . import __version__, codec, formats, fp8
from .activation import input_scale_for, predicted_input_error
from .atomic import atomic_output, check_output_path
from .calibration import CalibrationSource, RandomCalibration, RecordedStatistics
from .gptq import round_gptq
from .io import BufferPool, SafetensorsReader, SafetensorsWriter, TensorInfo
from .job import ActivityCallback, Job
from .pipeline import one_cpu_thread, run_pipeline
from .policy import (
    AUTO,
    PRESETS,
    LayerPolicy,
    Preset,
    block_prefixes,
    checkpoint_prefix,
    compile_regex,
    detect_family,
    scale_group,
    text_encoders_in_checkpoint,
)
from .rounding import RoundingOptions, RoundingResult, release_tables, round_learned, round_nearest

ROUNDING_METHODS = {
    "auto": "GPTQ where --calibration has statistics, round-to-nearest elsewhere",
    "nearest": "round-to-nearest everywhere (the seed's --simple)",
    "learned": "GPTQ where --calibration has statistics, the seed's learned rounding on random inputs elsewhere",
}


class TensorSource(Protocol):
    """What the engine reads from: tensor descriptions up front, tensors one at a time.

    A source whose ``read`` returns tensors on a GPU says so with a ``device`` attribute (as the
    nodes' loaded-MODEL source does): then only one item is in flight, so that beyond what the
    host already holds, VRAM keeps one layer's working set.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class ConvertOptions:
    """Every conversion setting; the defaults are the seed script's."""

    format: str = "comfy"
    fp8_format: str = "float8_e4m3fn"
    method: str = "auto"  # see ROUNDING_METHODS
    rounding: RoundingOptions = field(default_factory=RoundingOptions)
    shared_scales: bool = True
    min_tensor_size: int = 1024
    preset: str = AUTO
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    t5xxl: bool = False
    keep_distillation: bool = False
    text_encoders: bool = False  # full checkpoints: also the T5 / LLM text encoders inside (see policy)
    calibration: str | None = None  # a Recorder file: GPTQ for the weights it has statistics for
    input_scales: bool = False  # a static input_scale per layer from the calibration file's input_absmax
    uncalibrated_fp8_compute: bool = False  # layers without an input_scale run fp8 compute at scale 1 too
    full_precision: list[str] = field(default_factory=list)  # regexes: full_precision_matrix_mult layers
    full_precision_above: float | None = None  # ... and layers whose fp8 inputs would add more output error
    parallel: bool = False
    shard: tuple[int, int] | None = None  # (k, n): only every n-th work item from the k-th (1-based); see join
    device: str | None = None  # None: CUDA when available, else CPU
    overwrite: bool = False


@dataclass
class TensorReport:
    """One tensor's outcome, handed to the progress callback as soon as it is written."""

    name: str
    index: int  # 1-based count of tensors finished so far
    total: int
    nbytes: int  # source bytes of this tensor
    quantized: bool
    reason: str
    method: str = ""  # how a quantized weight was rounded: nearest, learned or gptq
    error_before: float = 0.0  # round-to-nearest's relative error
    error_after: float = 0.0  # the written result's relative error
    seconds: float = 0.0
    fell_back: bool = False


@dataclass
class Summary:
    input: str
    output: str
    format: str
    preset: str
    quantized: int
    kept: int
    bytes_in: int
    bytes_out: int
    mean_error: float
    worst_error: float
    worst_tensor: str
    fallbacks: int
    methods: dict[str, int]  # quantized tensors per rounding method
    seconds: float
    reports: list[TensorReport] = field(repr=False, default_factory=list)

    def text(self) -> str:
        """The end-of-run summary printed by the CLI and shown by the nodes."""
        ratio = self.bytes_out / self.bytes_in if self.bytes_in else 0.0
        lines = [
            f"output    {self.output} ({self.format}, preset {self.preset})",
            f"family    {PRESETS[self.preset].family}",
            f"tensors   {self.quantized} quantized, {self.kept} kept",
            f"size      {_gib(self.bytes_in)} -> {_gib(self.bytes_out)} ({ratio:.1%})",
            f"error     mean {self.mean_error:.4%}, worst {self.worst_error:.4%} ({self.worst_tensor or '-'})",
            f"time      {self.seconds:.1f} s",
        ]
        if self.methods:
            used = ", ".join(f"{count} {method}" for method, count in sorted(self.methods.items()))
            kept = f"; {self.fallbacks} kept round-to-nearest, which won on held-out inputs" if self.fallbacks else ""
            lines.insert(3, f"rounding  {used}{kept}")
        return "\n".join(lines)


ProgressCallback = Callable[[TensorReport], None]


@dataclass
class Plan:
    """Every decision that fixes the output header, made before any tensor is read."""

    preset: Preset
    prefix: str
    decisions: dict[str, tuple[bool, str]]
    items: list[list[str]]  # work items: one kept tensor, or one scale group of weights
    entries: list[TensorInfo]
    markers: dict[str, torch.Tensor]  # file-level format markers, written first
    activations: dict[str, formats.Activation]  # per quantized weight; an input_scale of 1.0 is a placeholder
    outputs: dict[str, list[str]]  # the output tensors each source tensor becomes

    def digest(self, metadata: dict[str, str]) -> str:
        """A fingerprint of the output header (its tensors and ``metadata``): shards of one conversion share it."""
        layout = [(e.name, str(e.dtype), list(e.shape)) for e in self.entries]
        return hashlib.sha256(json.dumps([layout, metadata], sort_keys=True).encode()).hexdigest()


@dataclass
class Rounder:
    """Chooses each weight's rounding (see ``ROUNDING_METHODS``).

    Without recorded statistics the default is round-to-nearest: against random inputs learned
    rounding can only fit noise (their expected output error is minimised by round-to-nearest;
    measured in bench/bench_quality.py), so it is opt-in (``learned``), as the seed ran it.
    """

    dtype: torch.dtype
    options: ConvertOptions
    calibration: CalibrationSource
    statistics: RecordedStatistics | None = None
    pool: BufferPool = field(default_factory=BufferPool)  # memory for round-to-nearest's outputs

    def round(self, name: str, weight: torch.Tensor, scale: float, job: Job) -> tuple[RoundingResult, str]:
        """The rounded weight and the method used; ``job`` sees its progress and may stop it."""
        recorded = self.statistics is not None and self.options.method != "nearest"
        stats = self.statistics.get(name, weight.shape[1]) if recorded else None
        method = "gptq" if stats is not None else "learned" if self.options.method == "learned" else "nearest"
        with job.tensor(name, method) as step:
            if method == "gptq":
                return round_gptq(weight, scale, self.dtype, stats, step=step), method
            if method == "learned":
                with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
                    options = self.options.rounding
                    return round_learned(name, weight, scale, self.dtype, self.calibration, options, step), method
            with one_cpu_thread(weight.device):  # memory-bound passes; the pipeline keeps the other core busy
                return round_nearest(weight, scale, self.dtype, self.pool, step), method


def plan_conversion(source: TensorSource, options: ConvertOptions, poll: Callable[[], None] | None = None) -> Plan:
    """Decide what happens to each tensor and lay out the output, from names and shapes alone
    (and, for ``--full_precision_above``, the weights: ``poll`` is called before each is read)."""
    if options.format not in formats.FORMATS:
        raise ValueError(f"unknown --format {options.format!r}; choose one of {formats.FORMATS}")
    if options.method not in ROUNDING_METHODS:
        raise ValueError(f"unknown rounding method {options.method!r}; choose one of {list(ROUNDING_METHODS)}")
    if options.preset != AUTO and options.preset not in PRESETS:
        raise ValueError(f"unknown --preset {options.preset!r}; choose one of {[AUTO, *PRESETS]}")
    dtype = fp8.fp8_dtype(options.fp8_format)
    keys = list(source.tensors)
    prefix = checkpoint_prefix(keys)
    preset = detect_family(keys) if options.preset == AUTO else PRESETS[options.preset]
    if preset.text_encoder and options.input_scales:
        raise ValueError(
            "input scales: ComfyUI multiplies text encoders in full precision, so a text encoder gets none; "
            "turn 'input scales' off"
        )
    blocks = block_prefixes(keys)
    policy = LayerPolicy(preset, *_user_rules(options), prefix, blocks)
    text_encoders = _text_encoder_policies(keys, options, prefix, blocks)
    activations: dict[str, formats.Activation] = {}
    decisions: dict[str, tuple[bool, str]] = {}
    outputs: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    items: list[list[str]] = []
    entries: list[TensorInfo] = []
    with _activation_rule(source, options, prefix, poll or (lambda: None)) as planned:
        for name, info in source.tensors.items():
            owner = next((p for p in text_encoders if name.startswith(p.prefix)), policy)
            decision = owner.decide(name, info.dtype, info.shape)
            decisions[name] = (decision.quantize, decision.reason)
            if not decision.quantize:
                items.append([name])
                entries.append(TensorInfo(name, info.dtype, info.shape))
                outputs[name] = [name]
                continue
            # ComfyUI multiplies text encoders in full precision: no input scale; weight-only, as the flag says.
            activations[name] = planned(name) if owner is policy else formats.Activation(None, True)
            layer = formats.layer_entries(options.format, name, info.shape, dtype, activations[name])
            entries += layer
            outputs[name] = [entry.name for entry in layer]
            group_key = scale_group(name) if options.shared_scales else name
            if group_key not in groups:
                groups[group_key] = []
                items.append(groups[group_key])
            groups[group_key].append(name)
    quantized = sum(q for q, _ in decisions.values())
    if not quantized:
        raise ValueError(
            "nothing to quantize: no eligible 2-D float weight passed the layer policy "
            f"(is the input already FP8-scaled? see --preset, --include, --min_tensor_size); family: {preset.family}"
        )
    markers = _markers(options, dtype, activations, prefix)
    for owner in text_encoders:
        if any(decisions[k][0] for k in keys if k.startswith(owner.prefix)):
            markers.update(_markers(options, dtype, activations, owner.prefix))
    for key, tensor in markers.items():
        if key in source.tensors:
            raise ValueError(f"the input already has a tensor named {key!r}; is it already converted?")
        entries.append(TensorInfo(key, tensor.dtype, tuple(tensor.shape)))
    return Plan(preset, prefix, decisions, items, entries, markers, activations, outputs)


def _markers(
    options: ConvertOptions, dtype: torch.dtype, activations: dict[str, formats.Activation], prefix: str
) -> dict[str, torch.Tensor]:
    """The layout's file-level markers for the model under ``prefix``; a ``legacy`` marker says
    whether that model's layers are weight-only (they must agree, ``formats.legacy_full_precision``)."""
    full = True
    if options.format == "legacy":
        full = formats.legacy_full_precision({k: a for k, a in activations.items() if k.startswith(prefix)})
    return formats.marker_tensors(options.format, prefix, dtype, options.shared_scales, full)


def _user_rules(options: ConvertOptions) -> tuple:
    """The LayerPolicy arguments every part of a file shares: size threshold, regexes, seed flags."""
    return options.min_tensor_size, options.include, options.exclude, options.t5xxl, options.keep_distillation


def _text_encoder_policies(
    keys: list[str], options: ConvertOptions, prefix: str, blocks: frozenset[str]
) -> list[LayerPolicy]:
    """With ``--text_encoders``, a policy per T5 / LLM text encoder inside a full checkpoint; by default
    only the diffusion model of a full checkpoint is converted."""
    if not options.text_encoders:
        return []
    if not prefix:
        raise ValueError("'text encoders' applies to full checkpoints (model + VAE + text encoders) only")
    if options.format == "ultra8":
        raise ValueError("'text encoders' needs format comfy or legacy: ComfyUI's checkpoint loader reads those")
    found = text_encoders_in_checkpoint(keys)
    if not found:
        raise ValueError(
            "'text encoders': this checkpoint holds no T5 or LLM text encoder ComfyUI reads quantized "
            "(CLIP is always kept whole)"
        )
    return [LayerPolicy(preset, *_user_rules(options), te_prefix, blocks) for te_prefix, preset in found.items()]


@contextlib.contextmanager
def _activation_rule(
    source: TensorSource, options: ConvertOptions, prefix: str, poll: Callable[[], None]
) -> Iterator[Callable[[str], formats.Activation]]:
    """Which quantized weights get an input scale or full precision, decided before any tensor is
    written because both change the header.

    A weight gets an input scale with ``--input_scales`` when the calibration file has its
    statistics (``_quantize_group`` fills in the value). It is full precision (weight-only: ComfyUI
    dequantizes it even on a GPU with fp8 compute) when it has no input scale, unless
    ``--uncalibrated_fp8_compute`` asks for ComfyUI's scale of 1; when it matches
    ``--full_precision``; or when ``--full_precision_above`` is set and rounding its recorded inputs
    to fp8 is predicted to add more relative output error than that (which reads the weight and
    its statistics once more)."""
    patterns = [compile_regex(p, "--full_precision") for p in options.full_precision]
    threshold = options.full_precision_above
    uncalibrated = options.uncalibrated_fp8_compute

    def flagged(name: str, input_scale: float | None) -> bool:
        return (input_scale is None and not uncalibrated) or any(p.search(name) for p in patterns)

    if not options.input_scales and threshold is None:
        yield lambda name: formats.Activation(None, flagged(name, None))
        return
    if not options.calibration:
        raise ValueError("--input_scales and --full_precision_above need --calibration: recorded input statistics")
    device = pick_devices(options)[0]
    dtype = fp8.fp8_dtype(options.fp8_format)
    with RecordedStatistics(options.calibration, prefix) as statistics:

        def hurts(name: str) -> bool:
            poll()
            weight = source.read(name).to(device)
            stats = statistics.get(name, weight.shape[1])
            return predicted_input_error(weight, stats.fit, dtype) > threshold

        def planned(name: str) -> formats.Activation:
            recorded = statistics.key(name) is not None
            input_scale = 1.0 if recorded and options.input_scales else None
            full = flagged(name, input_scale) or (threshold is not None and recorded and hurts(name))
            return formats.Activation(input_scale, full)

        yield planned


def default_output_path(input_path: str | os.PathLike, options: ConvertOptions) -> Path:
    """``{base}_{fp8}_scaled…`` next to the input; ``ultra8`` follows the seed script's rule."""
    path = Path(input_path)
    distill = "_nodistill" if options.keep_distillation else ""
    if options.format == "ultra8":
        size = "_8bit_shared" if options.shared_scales else "_8bit"
        name = f"{path.stem}_{options.fp8_format}_scaled_ultra{distill}{size}"
    else:
        layout = "_legacy" if options.format == "legacy" else ""
        name = f"{path.stem}_{options.fp8_format}_scaled{layout}{distill}"
    return path.with_name(name + ".safetensors")


def pick_devices(options: ConvertOptions) -> list[torch.device]:
    """The compute devices: the one asked for, else every GPU (``--parallel``) or the first, else CPU."""
    if options.device:
        return [torch.device(options.device)]
    if torch.cuda.is_available():
        count = torch.cuda.device_count() if options.parallel else 1
        return [torch.device("cuda", i) for i in range(count)]
    return [torch.device("cpu")]


def convert(
    source: TensorSource,
    output: str | os.PathLike,
    options: ConvertOptions,
    progress: ProgressCallback | None = None,
    check_interrupt: Callable[[], None] | None = None,
    calibration: CalibrationSource | None = None,
    protect: tuple[Path, ...] = (),
    source_label: str = "",
    pool: BufferPool | None = None,
    activity: ActivityCallback | None = None,
) -> Summary:
    """Convert ``source`` into the safetensors file ``output`` (written atomically).

    ``pool`` holds the memory of round-to-nearest's outputs; pass the source's own pool (as
    ``convert_file`` does) so that one high-water mark bounds inputs and outputs together.
    ``check_interrupt`` (raises to cancel), ``progress`` (each finished tensor) and ``activity``
    (the tensor being rounded, every half second) are called in this thread only (``job.Job``).
    However it ends, the conversion holds no tensor on a GPU afterwards: the rounding's cached
    tables are dropped, and a failure's traceback keeps its lines but not the local variables of
    its frames (a GPU weight in a failed stage would otherwise stay allocated for as long as the
    caller keeps the exception, e.g. ComfyUI while it reports the error).
    """
    try:
        return _convert(
            source, output, options, progress, check_interrupt, calibration, protect, source_label, pool, activity
        )
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        release_tables()


def _convert(
    source, output, options, progress, check_interrupt, calibration, protect, source_label, pool, activity
) -> Summary:
    started = time.perf_counter()
    protect = run_inputs(options, *protect)
    check_output_path(output, options.overwrite, protect)  # before any work; checked again when writing
    job = Job(check_interrupt, activity)
    plan = plan_conversion(source, options, job.poll)
    check_calibration(options, plan)
    reports: list[TensorReport] = []
    metadata = output_metadata(source, options, plan)
    items, entries, markers = plan.items, plan.entries, plan.markers
    if options.shard:  # a part of the output, to be joined with the others (``shards.join_shards``)
        items, entries, markers, metadata = _shard(plan, options.shard, metadata)
    total = sum(map(len, items))

    def read(item: list[str]) -> dict[str, torch.Tensor]:
        return {name: source.read(name) for name in item}

    def compute(item: list[str], tensors: dict[str, torch.Tensor], device: torch.device) -> list:
        if not plan.decisions[item[0]][0]:
            name = item[0]
            return [(name, {name: tensors[name]}, _report(name, source, plan, 0.0))]
        return _quantize_group(item, tensors, device, rounder, source, plan, job)

    recorded = options.calibration and (options.input_scales or options.method != "nearest")  # GPTQ, input_scale
    with (
        RecordedStatistics(options.calibration, plan.prefix) if recorded else contextlib.nullcontext() as statistics,
        atomic_output(output, overwrite=options.overwrite, protect=protect) as file,
    ):
        dtype = fp8.fp8_dtype(options.fp8_format)
        rounder = Rounder(dtype, options, calibration or RandomCalibration(), statistics, pool or BufferPool())
        writer = SafetensorsWriter(file, entries, metadata)
        for key, tensor in markers.items():
            writer.write(key, tensor)

        def write(results: list) -> None:
            for _, tensors, report in results:
                for key, tensor in tensors.items():
                    writer.write(key, tensor)
                report.index, report.total = len(reports) + 1, total
                reports.append(report)
                if progress:
                    progress(report)

        def cost(item: list[str]) -> int:
            return sum(source.tensors[name].nbytes for name in item)

        def held(results: list) -> int:
            return sum(t.nbytes for _, tensors, _ in results for t in tensors.values())

        # two of the largest items (a shared-scale group) in flight: one read while the other is
        # rounded or written. A 24 GB Flux took 49 s at 694 MB peak RSS, and 54 s at 629 MB with
        # room for the largest item plus the largest tensor alone (bench/bench_convert.py)
        on_accelerator = torch.device(getattr(source, "device", "cpu")).type != "cpu"
        budget = (1 if on_accelerator else 2) * max(map(cost, plan.items))
        run_pipeline(items, read, compute, write, pick_devices(options), cost, held, budget, job)
        writer.finish()
        bytes_out = writer.total_bytes
    return _summarise(source, source_label, output, options, plan, reports, bytes_out, time.perf_counter() - started)


def run_inputs(options: ConvertOptions, *paths: str | os.PathLike) -> tuple[str | os.PathLike, ...]:
    """Every file a run reads: ``paths`` and the calibration file. None of them may become the
    output, and none may change while the run works (``atomic.atomic_output``)."""
    return (*paths, *([options.calibration] if options.calibration else []))


def check_calibration(options: ConvertOptions, plan: Plan) -> None:
    """Refuse a calibration file that the run would not use, for every front end alike.

    With round-to-nearest and no input scales the file is never opened; a file whose statistics
    name none of the weights to quantize (recorded on another model) changes nothing. Either way
    the user believes the output is calibrated when it is not. A full checkpoint's
    ``model.diffusion_model.`` weights match a recording of its diffusion model (``plan.prefix``).
    """
    if not options.calibration:
        return
    if options.method == "nearest" and not options.input_scales and options.full_precision_above is None:
        raise ValueError(
            "a calibration file needs rounding 'auto' or 'learned' (GPTQ for the recorded layers): with rounding "
            "'nearest' (--simple) it would be ignored"
        )
    with RecordedStatistics(options.calibration, plan.prefix) as statistics:
        quantized = [name for name, (quantize, _) in plan.decisions.items() if quantize]
        if not any(statistics.key(name) for name in quantized):
            raise ValueError(
                f"the calibration file {Path(options.calibration).name} has statistics for none of the weights "
                "to quantize: was it recorded on another model?"
            )


def output_metadata(source: TensorSource, options: ConvertOptions, plan: Plan) -> dict[str, str]:
    """The output header's metadata: the source's own, plus the converter's description."""
    return {**source.metadata, "quant_core": json.dumps(_describe(options, plan))}


SHARD_METADATA = "quant_core_shard"


def _shard(plan: Plan, shard: tuple[int, int], metadata: dict[str, str]) -> tuple:
    """Items, output entries, markers and metadata of shard ``k`` of ``n``: every n-th work item
    from the k-th, in a file of its own that carries the whole output's fingerprint."""
    k, n = shard
    if not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: k must be between 1 and n")
    items = plan.items[k - 1 :: n]
    names = {key for item in items for name in item for key in plan.outputs[name]}
    entries = [entry for entry in plan.entries if entry.name in names]
    label = {"shard": f"{k}/{n}", "output": plan.digest(metadata)}
    return items, entries, {}, {SHARD_METADATA: json.dumps(label)}


def convert_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    options: ConvertOptions | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Callable[[], None] | None = None,
    calibration: CalibrationSource | None = None,
    activity: ActivityCallback | None = None,
) -> Summary:
    """Convert one safetensors file; the output name defaults to ``default_output_path``."""
    options = options or ConvertOptions()
    output = Path(output_path) if output_path else default_output_path(input_path, options)
    pool = BufferPool()
    with SafetensorsReader(input_path, pool) as reader:
        return convert(
            reader,
            output,
            options,
            progress,
            check_interrupt,
            calibration,
            protect=(Path(input_path),),
            source_label=str(input_path),
            pool=pool,
            activity=activity,
        )


def _quantize_group(
    names: list[str],
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    rounder: Rounder,
    source: TensorSource,
    plan: Plan,
    job: Job,
) -> list:
    """Quantize a shared-scale group (or one weight) against one scale; returns write-ready results.

    The group's scale is found on the source dtype (its max is exact), and each member is widened
    to float32 only while it is being rounded, so the group costs its source bytes plus one
    float32 weight at a time.
    """
    for name in names:
        tensors[name] = tensors[name].to(device)
    with one_cpu_thread(device):
        amaxes = [fp8.absmax(tensors[name]) for name in names]
    for name, member_amax in zip(names, amaxes, strict=True):  # NaN and Inf both surface in a member's absolute maximum
        if not math.isfinite(member_amax):
            fp8.check_finite(name, tensors[name])
    amax = max(amaxes)  # all finite: Python's max would pass over a NaN that is not first
    layout = rounder.options.format
    try:
        scale = formats.stored_scale(layout, fp8.scale_for(amax, rounder.dtype))
    except codec.ScaleOutOfRangeError as exc:
        raise codec.ScaleOutOfRangeError(f"{', '.join(names)}: {exc}; exclude it or use --format comfy") from None
    results = []
    for name in names:
        started = time.perf_counter()
        weight = tensors.pop(name)  # in its source dtype: the rounding widens one block at a time
        result, method = rounder.round(name, weight, scale, job)
        activation = _activation(name, rounder, plan)
        layer = formats.layer_tensors(layout, name, result.quantized.cpu(), scale, activation)
        report = _report(name, source, plan, time.perf_counter() - started)
        report.method = method
        report.error_before, report.error_after, report.fell_back = result.error_rtn, result.error, result.fell_back
        results.append((name, layer, report))
        del weight, result
    return results


def _activation(name: str, rounder: Rounder, plan: Plan) -> formats.Activation:
    """The planned activation settings, with the input scale calibrated on the recorded absolute maximum."""
    activation = plan.activations[name]
    if activation.input_scale is None:
        return activation
    absmax = rounder.statistics.input_absmax(name)
    return replace(activation, input_scale=input_scale_for(absmax, rounder.dtype))


def _report(name: str, source: TensorSource, plan: Plan, seconds: float) -> TensorReport:
    quantize, reason = plan.decisions[name]
    return TensorReport(name, 0, 0, source.tensors[name].nbytes, quantize, reason, seconds=seconds)


def _describe(options: ConvertOptions, plan: Plan) -> dict:
    """The converter's own header metadata: version, settings, counts."""
    quantized = sum(q for q, _ in plan.decisions.values())
    settings = asdict(options)
    for how_not_what in ("overwrite", "parallel", "device", "shard"):  # they do not change the output
        settings.pop(how_not_what)
    if options.method != "learned":  # the learned-rounding settings are not used
        settings.pop("rounding")
    return {
        "version": __version__,
        "preset": plan.preset.name,
        "quantized": quantized,
        "kept": len(plan.decisions) - quantized,
        "input_scales": sum(a.input_scale is not None for a in plan.activations.values()),
        "full_precision": sum(a.full_precision for a in plan.activations.values()),
        "settings": settings,
    }


def _summarise(source, label, output, options, plan, reports, bytes_out, seconds) -> Summary:
    quantized = [r for r in reports if r.quantized]
    worst = max(quantized, key=lambda r: r.error_after, default=None)
    return Summary(
        input=label,
        output=str(output),
        format=options.format,
        preset=plan.preset.name,
        quantized=len(quantized),
        kept=len(reports) - len(quantized),
        bytes_in=sum(r.nbytes for r in reports),
        bytes_out=bytes_out,
        mean_error=sum(r.error_after for r in quantized) / len(quantized) if quantized else 0.0,
        worst_error=worst.error_after if worst else 0.0,
        worst_tensor=worst.name if worst else "",
        fallbacks=sum(r.fell_back for r in quantized),
        methods=dict(Counter(r.method for r in quantized)),
        seconds=seconds,
        reports=reports,
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
