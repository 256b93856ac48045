"""The conversion engine: plan the output from the header, then stream tensors through it.

``convert`` works on any ``TensorSource`` (a safetensors file, or a loaded model in the
ComfyUI nodes); ``convert_file`` is the file-to-file entry point used by the command line.
Work is done per *item*: one kept tensor, or one shared-scale group of weights that must be
scaled together. Peak memory is therefore a few of the largest tensors, never the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import __version__, budget, codec, consumers, formats, fp8
from .activation import input_scale_for, predicted_input_error
from .atomic import atomic_output, check_output_path, input_identities
from .calibration import CalibrationSource, LayerStatistics, RandomCalibration, RecordedStatistics
from .estimate import Estimate
from .gptq import round_gptq
from .io import BufferPool, SafetensorsReader, SafetensorsWriter, TensorInfo, dtype_nbytes, file_size
from .job import ActivityCallback, Job
from .options import ConvertOptions
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
    side_stream,
    text_encoders_in_checkpoint,
)
from .rounding import PatternCounts, RoundingResult, release_tables, round_learned, round_nearest


class TensorSource(Protocol):
    """What the engine reads from: tensor descriptions up front, tensors one at a time.

    Optional attributes: ``device``, where ``read`` returns tensors on a GPU (the nodes' loaded
    MODEL): then only one item is in flight, so that beyond what the host already holds, VRAM
    keeps one layer's working set. ``path``, the file read (a ``SafetensorsReader``): the output
    may never replace it, and the summary names it. ``pool``, the reader's ``io.BufferPool``:
    round-to-nearest's outputs then share it, so one high-water mark bounds inputs and outputs.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def read(self, name: str) -> torch.Tensor: ...


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
    error_before: float = 0.0  # round-to-nearest's relative error (of the same measure)
    error_after: float = 0.0  # the written result's relative error (see ``measure``)
    seconds: float = 0.0
    fell_back: bool = False
    eta: float | None = None  # seconds left in the conversion once this tensor is written; None: no basis yet
    share: float | None = None  # of the conversion's work, done once it is written (0..1); None: nothing to round

    @property
    def measure(self) -> str:
        """What the errors measure: learned and calibrated rounding are judged by the layer's output
        on held-out inputs (the guard that may keep round-to-nearest compares those), round-to-nearest
        by the weight's own error. The two are not comparable, so reports never mix them."""
        return "output" if self.method in OUTPUT_MEASURED else "weight"


OUTPUT_MEASURED = ("learned", "gptq")
MEASURES = {
    "weight": "relative weight error",
    "output": "relative output error on held-out inputs",
}


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
    max_bytes: int | None = None  # the size budget (max_size), when given
    kept_layers: list[budget.KeptLayer] = field(default_factory=list)  # what it kept in the source dtype, and why

    def text(self) -> str:
        """The end-of-run summary printed by the CLI and shown by the nodes."""
        ratio = self.bytes_out / self.bytes_in if self.bytes_in else 0.0
        lines = [
            f"output    {self.output} ({self.format}, preset {self.preset})",
            f"family    {PRESETS[self.preset].family}",
            f"tensors   {self.quantized} quantized, {self.kept} kept",
            f"size      {_gib(self.bytes_in)} -> {_gib(self.bytes_out)} ({ratio:.1%})",
            *(f"error     {line}" for line in self.error_lines()),
            f"time      {self.seconds:.1f} s",
        ]
        if self.methods:
            used = ", ".join(f"{count} {method}" for method, count in sorted(self.methods.items()))
            kept = (
                f"; {self.fallbacks} kept round-to-nearest, which had the lower output error on held-out inputs"
                if self.fallbacks
                else ""
            )
            lines.insert(3, f"rounding  {used}{kept}")
        return "\n".join(lines + self.budget_lines())

    def budget_lines(self) -> list[str]:
        """What the size budget kept in the source dtype, and why (see ``budget.py``)."""
        if self.max_bytes is None:
            return []
        kept = self.kept_layers
        lines = [
            f"budget    max_size {_gib(self.max_bytes)} ({self.max_bytes:,} bytes), file {self.bytes_out:,} bytes; "
            f"{len(kept)} layers kept in full precision ({sum(k.saved for k in kept):,} bytes more than fp8)"
        ]
        if kept:
            lines.append(
                "          highest fp8 error power per byte first: the bytes each costs, fp8's predicted error"
            )
        return lines + [f"          {layer.line()}" for layer in kept]

    def errors(self) -> list[dict]:
        """Mean and worst error of the quantized tensors, one entry per measure used (``TensorReport.measure``)."""
        entries = []
        for measure, label in MEASURES.items():
            reports = [r for r in self.reports if r.quantized and r.measure == measure]
            if reports:
                worst = max(reports, key=lambda r: r.error_after)
                mean = sum(r.error_after for r in reports) / len(reports)
                entries.append(
                    {
                        "measure": label,
                        "layers": len(reports),
                        "mean": mean,
                        "worst": worst.error_after,
                        "worst_tensor": worst.name,
                    }
                )
        return entries

    def error_lines(self) -> list[str]:
        return [
            f"{e['measure']} ({e['layers']} layers): mean {e['mean']:.4%}, worst {e['worst']:.4%} ({e['worst_tensor']})"
            for e in self.errors()
        ] or ["-"]


ProgressCallback = Callable[[TensorReport], None]


@dataclass
class Converted:
    """One source tensor's outcome: the output tensors it becomes, ready to write, and its report."""

    tensors: dict[str, torch.Tensor]
    report: TensorReport


@dataclass
class Plan:
    """Every decision, resolved once before any tensor is read: the settings turned into objects
    (fp8 dtype, layout, devices, the opened calibration file) and what happens to each tensor,
    which fixes the output header. ``close`` (or ``with``) closes the calibration file."""

    options: ConvertOptions
    dtype: torch.dtype
    layout: formats.Layout
    devices: list[torch.device]
    preset: Preset
    prefix: str
    statistics: RecordedStatistics | None
    decisions: dict[str, tuple[bool, str]] = field(default_factory=dict)
    items: list[list[str]] = field(default_factory=list)  # work items: one kept tensor, or one scale group
    entries: list[TensorInfo] = field(default_factory=list)
    markers: dict[str, torch.Tensor] = field(default_factory=dict)  # file-level layout markers, written first
    activations: dict[str, formats.Activation] = field(default_factory=dict)  # per quantized weight
    outputs: dict[str, list[str]] = field(default_factory=dict)  # the output tensors each source tensor becomes
    layers: dict[str, list[TensorInfo]] = field(default_factory=dict)  # each quantizable weight's output entries
    encoders: list[str] = field(default_factory=list)  # prefixes of the text encoders converted too
    max_bytes: int | None = None  # max_size in bytes, when given
    kept: list[budget.KeptLayer] = field(default_factory=list)  # what the budget keeps in the source dtype

    def digest(self, metadata: dict[str, str]) -> str:
        """A fingerprint of the output header (its tensors and ``metadata``): shards of one conversion share it."""
        layout = [(e.name, str(e.dtype), list(e.shape)) for e in self.entries]
        return hashlib.sha256(json.dumps([layout, metadata], sort_keys=True).encode()).hexdigest()

    def gptq_statistics(self) -> RecordedStatistics | None:
        """The recorded statistics that choose GPTQ, unless rounding is nearest everywhere."""
        return self.statistics if self.options.rounding != "nearest" else None

    def close(self) -> None:
        if self.statistics is not None:
            self.statistics.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Rounder:
    """Chooses each weight's rounding (see ``options.ROUNDING``).

    Without recorded statistics the default is round-to-nearest: against random inputs learned
    rounding can only fit noise (their expected output error is minimised by round-to-nearest;
    ``docs/calibration.md``), so it is opt-in (``learned``), as the original script ran it.
    """

    plan: Plan
    learned_inputs: CalibrationSource  # where learned rounding draws its inputs
    pool: BufferPool  # memory for round-to-nearest's outputs
    source: TensorSource | None = None  # where GPTQ reads the weight that consumes a layer's output

    def round(
        self, name: str, weight: torch.Tensor, scale: float, job: Job, counts: PatternCounts | None = None
    ) -> tuple[RoundingResult, str]:
        """The rounded weight and the method used; ``job`` sees its progress and may stop it.
        ``counts``: the weight's bit patterns, counted as it was read (``counted``)."""
        dtype, options, method = self.plan.dtype, self.plan.options, self.method(name)
        with job.tensor(name, method) as step:
            if method == "gptq":
                stats = self.plan.gptq_statistics().get(name, weight.shape[1], self.pool)
                metric = self.output_metric(name, weight, stats)
                return round_gptq(weight, scale, dtype, stats, step=step, metric=metric, pool=self.pool), method
            if method == "learned":
                return round_learned(name, weight, scale, dtype, self.learned_inputs, options.learned, step), method
            with one_cpu_thread(weight.device):  # memory-bound passes; the pipeline keeps the other core busy
                return round_nearest(weight, scale, dtype, self.pool, step, counts), method

    def output_metric(self, name: str, weight: torch.Tensor, stats: LayerStatistics) -> torch.Tensor | None:
        """The output-side metric of ``consumers`` for GPTQ's polish, where a rule names the weight
        that consumes ``name``'s output and both the source and the calibration file have it."""
        other = consumers.consumer(name, self.source.tensors) if self.source is not None else None
        consumer_stats = self.plan.gptq_statistics().get(other, weight.shape[0]) if other is not None else None
        if consumer_stats is None:
            return None
        scaling = consumers.passed(weight, stats.fit, consumer_stats.fit)
        return consumers.output_metric(self.source.read(other).to(weight.device), scaling)

    def method(self, name: str) -> str:
        """How the weight ``name`` is rounded: gptq where the calibration file has its statistics."""
        statistics = self.plan.gptq_statistics()
        if statistics is not None and statistics.key(name) is not None:
            return "gptq"
        return "learned" if self.plan.options.rounding == "learned" else "nearest"

    def counted(self, name: str, info: TensorInfo) -> bool:
        """Whether the reader should count this weight's bit patterns (``rounding.PatternCounts``):
        a 16-bit matrix rounded to nearest on the CPU, which then needs no other look at it for
        its scale and error."""
        plan = self.plan
        return (
            plan.decisions[name][0]
            and self.method(name) == "nearest"
            and plan.devices[0].type == "cpu"
            and info.dtype in (torch.bfloat16, torch.float16)
            and len(info.shape) == 2
        )


def plan_conversion(source: TensorSource, options: ConvertOptions, poll: Callable[[], None] | None = None) -> Plan:
    """Resolve the settings and decide what happens to each tensor, from names and shapes (and,
    for ``full_precision_above`` and ``max_size``, from the weights and their recorded statistics:
    ``poll`` is called before each is read)."""
    options.validate()
    keys = list(source.tensors)
    prefix = checkpoint_prefix(keys)
    preset = detect_family(keys) if options.preset == AUTO else PRESETS[options.preset]
    if preset.text_encoder and options.input_scales:
        raise ValueError(
            "input scales: ComfyUI multiplies text encoders in full precision, so a text encoder gets none; "
            "turn 'input scales' off"
        )
    statistics = RecordedStatistics(options.calibration, prefix) if options.calibration else None
    try:
        plan = Plan(
            options,
            fp8.fp8_dtype(options.fp8_format),
            formats.layout(options.format),
            pick_devices(options),
            preset,
            prefix,
            statistics,
        )
        _plan_tensors(source, plan, poll or (lambda: None))
        _check_statistics_match(plan)
    except BaseException:
        if statistics is not None:
            statistics.close()
        raise
    return plan


def _check_statistics_match(plan: Plan) -> None:
    """Refuse a calibration file whose statistics name none of the weights to quantize (recorded
    on another model): the conversion would silently go uncalibrated. A full checkpoint's
    ``model.diffusion_model.`` weights match a recording of its diffusion model (``plan.prefix``)."""
    statistics = plan.statistics
    if statistics is not None and not any(statistics.key(name) for name in plan.activations):
        raise ValueError(
            f"the calibration file {Path(plan.options.calibration).name} has statistics for none of the weights "
            "to quantize: was it recorded on another model?"
        )


def _plan_tensors(source: TensorSource, plan: Plan, poll: Callable[[], None]) -> None:
    options, keys = plan.options, list(source.tensors)
    blocks = block_prefixes(keys)
    policy = LayerPolicy(plan.preset, *_user_rules(options), plan.prefix, blocks)
    text_encoders = _text_encoder_policies(keys, options, plan.prefix, blocks)
    plan.encoders = [owner.prefix for owner in text_encoders]
    activation_of = _activation_rule(source, plan, poll)
    for name, info in source.tensors.items():
        owner = next((p for p in text_encoders if name.startswith(p.prefix)), policy)
        decision = owner.decide(name, info.dtype, info.shape)
        plan.decisions[name] = (decision.quantize, decision.reason)
        if decision.quantize:
            # ComfyUI multiplies text encoders in full precision: no input scale; weight-only, as the flag says.
            plan.activations[name] = activation_of(name) if owner is policy else formats.Activation(None, True)
            plan.layers[name] = plan.layout.layer_entries(name, info.shape, plan.dtype, plan.activations[name])
    if not plan.activations:
        raise ValueError(
            "nothing to quantize: no eligible 2-D float weight passed the layer policy "
            "(is the input already FP8-scaled? see the settings preset, include and min_tensor_size); "
            f"family: {plan.preset.family}"
        )
    _fit_budget(source, plan, poll)
    _lay_out(source, plan)


def _lay_out(source: TensorSource, plan: Plan) -> Plan:
    """The work items and the output header (entries, markers) of the plan's decisions."""
    plan.items, plan.entries, plan.outputs = [], [], {}
    groups: dict[str, list[str]] = {}
    for name, info in source.tensors.items():
        if name not in plan.activations:
            plan.items.append([name])
            plan.entries.append(TensorInfo(name, info.dtype, info.shape))
            plan.outputs[name] = [name]
            continue
        plan.entries += plan.layers[name]
        plan.outputs[name] = [entry.name for entry in plan.layers[name]]
        group_key = scale_group(name) if plan.options.shared_scales else name
        if group_key not in groups:
            groups[group_key] = []
            plan.items.append(groups[group_key])
        groups[group_key].append(name)
    plan.markers = _markers(plan, plan.prefix)
    for prefix in plan.encoders:
        if any(name.startswith(prefix) for name in plan.activations):
            plan.markers.update(_markers(plan, prefix))
    for key, tensor in plan.markers.items():
        if key in source.tensors:
            raise ValueError(f"the input already has a tensor named {key!r}; is it already converted?")
        plan.entries.append(TensorInfo(key, tensor.dtype, tuple(tensor.shape)))
    return plan


def _fit_budget(source: TensorSource, plan: Plan, poll: Callable[[], None]) -> None:
    """With ``max_size``, keep the quantized layers that cost the output most per byte saved in
    their source dtype, as many as the exact output size allows (``budget.py``); refuse a budget
    no conversion meets, or one that would keep everything, before anything is written."""
    parsed = budget.parse_budget(plan.options.max_size)
    if parsed is None:
        return
    source_bytes = sum(info.nbytes for info in source.tensors.values())
    limit = parsed.limit(source_bytes)
    asked = f"max_size {parsed.text} ({_size(limit)})"
    if limit >= source_bytes:
        raise ValueError(
            f"{asked} is at least the size of the source's tensors ({_size(source_bytes)}): every layer would "
            "stay in full precision, a copy of the input; leave max_size empty to quantize every eligible layer, "
            "or give a smaller size"
        )
    smallest = output_size(source, _lay_out(source, plan))
    if smallest > limit:
        raise ValueError(
            f"{asked} is below the smallest file this conversion can write, {_size(smallest)} with every eligible "
            "layer in fp8; give at least that (or let more layers be quantized: preset, exclude, min_tensor_size)"
        )
    candidates = budget_candidates(source, plan, poll)

    def size_with(layers: list[budget.KeptLayer]) -> int:
        return output_size(source, _lay_out(source, _keeping(plan, layers)))

    kept = budget.choose(candidates, limit, size_with)
    chosen = _keeping(plan, kept)
    plan.decisions, plan.activations, plan.max_bytes, plan.kept = chosen.decisions, chosen.activations, limit, kept


def budget_candidates(source: TensorSource, plan: Plan, poll: Callable[[], None]) -> list[budget.KeptLayer]:
    """Every quantized weight the budget may keep (not those ``include`` forces to fp8), with the
    bytes keeping it costs and its predicted error and what of it reaches the output (``budget.py``):
    reads each weight (and its statistics) once."""
    include = [compile_regex(p, "include") for p in plan.options.include]
    candidates = []
    for name in plan.activations:
        if any(p.search(name) for p in include):
            continue
        poll()
        info = source.tensors[name]
        weight = source.read(name).to(plan.devices[0])
        stats = plan.statistics.get(name, info.shape[1]) if plan.statistics is not None else None
        error, measure = budget.predicted_error(weight, stats, plan.dtype)
        fitted = stats is not None and plan.gptq_statistics() is not None and stats.count >= info.shape[1]
        left = budget.FITTED if fitted else 1.0  # GPTQ rounds it on rows that determine its inputs
        del weight, stats
        saved = info.nbytes - sum(entry.numel * dtype_nbytes(entry.dtype) for entry in plan.layers[name])
        side = name.startswith(plan.prefix) and side_stream(plan.preset, name.removeprefix(plan.prefix))
        share = budget.SIDE_STREAM if side else 1.0
        candidates.append(budget.KeptLayer(name, saved, error, measure, math.prod(info.shape), share, left))
    return candidates


def _keeping(plan: Plan, kept: list[budget.KeptLayer]) -> Plan:
    """The plan with the layers ``kept`` in their source dtype (a copy; its layout still to be made)."""
    names = {layer.name for layer in kept}
    decisions = {**plan.decisions, **{layer.name: (False, layer.reason()) for layer in kept}}
    activations = {name: a for name, a in plan.activations.items() if name not in names}
    return dataclasses.replace(plan, decisions=decisions, activations=activations)


def output_size(source: TensorSource, plan: Plan) -> int:
    """The exact bytes the plan's output file will have (its header and metadata included)."""
    return file_size(plan.entries, output_metadata(source, plan))


def _markers(plan: Plan, prefix: str) -> dict[str, torch.Tensor]:
    """The layout's file-level markers for the model under ``prefix``; a ``legacy`` marker says
    whether that model's layers are weight-only (they must agree, ``formats.legacy_full_precision``)."""
    under = {name: a for name, a in plan.activations.items() if name.startswith(prefix)}
    full = plan.layout.marker_full_precision(under)
    return plan.layout.markers(prefix, plan.dtype, plan.options.shared_scales, full)


def _user_rules(options: ConvertOptions) -> tuple:
    """The LayerPolicy arguments every part of a file shares: size threshold, regexes, the original
    script's keep flags."""
    return options.min_tensor_size, options.include, options.exclude, options.t5xxl, options.keep_distillation


def _text_encoder_policies(
    keys: list[str], options: ConvertOptions, prefix: str, blocks: frozenset[str]
) -> list[LayerPolicy]:
    """With ``text_encoders``, a policy per T5 / LLM text encoder inside a full checkpoint; by default
    only the diffusion model of a full checkpoint is converted."""
    if not options.text_encoders:
        return []
    if not prefix:
        raise ValueError("'text encoders' applies to full checkpoints (model + VAE + text encoders) only")
    if not formats.layout(options.format).loads_in_stock_comfyui:
        raise ValueError("'text encoders' needs format comfy or legacy: ComfyUI's checkpoint loader reads those")
    found = text_encoders_in_checkpoint(keys)
    if not found:
        raise ValueError(
            "'text encoders': this checkpoint holds no T5 or LLM text encoder ComfyUI reads quantized "
            "(CLIP is always kept whole)"
        )
    return [LayerPolicy(preset, *_user_rules(options), te_prefix, blocks) for te_prefix, preset in found.items()]


def _activation_rule(source: TensorSource, plan: Plan, poll: Callable[[], None]) -> Callable[[str], formats.Activation]:
    """Which quantized weights get an input scale or full precision, decided before any tensor is
    written because both change the header.

    A weight gets an input scale (from its recorded inputs' absolute maximum) with ``input_scales``
    when the calibration file has its statistics. It is full precision (weight-only: ComfyUI
    dequantizes it even on a GPU with fp8 compute) when it has no input scale, unless
    ``uncalibrated_fp8_compute`` asks for ComfyUI's scale of 1; when it matches ``full_precision``;
    or when ``full_precision_above`` is set and rounding its recorded inputs to fp8 is predicted to
    add more relative output error than that (which reads the weight and its statistics once more)."""
    options, statistics = plan.options, plan.statistics
    patterns = [compile_regex(p, "full_precision") for p in options.full_precision]
    threshold = options.full_precision_above

    def flagged(name: str, input_scale: float | None) -> bool:
        return (input_scale is None and not options.uncalibrated_fp8_compute) or any(p.search(name) for p in patterns)

    def hurts(name: str) -> bool:
        poll()
        weight = source.read(name).to(plan.devices[0])
        stats = statistics.get(name, weight.shape[1])
        return predicted_input_error(weight, stats.fit, plan.dtype) > threshold

    def planned(name: str) -> formats.Activation:
        recorded = statistics is not None and statistics.key(name) is not None
        scaled = recorded and options.input_scales
        input_scale = input_scale_for(statistics.input_absmax(name), plan.dtype) if scaled else None
        full = flagged(name, input_scale) or (threshold is not None and recorded and hurts(name))
        return formats.Activation(input_scale, full)

    return planned


def default_output_path(input_path: str | os.PathLike, options: ConvertOptions) -> Path:
    """``{base}_{fp8}_scaled…`` next to the input; ``ultra8`` follows the seed script's rule."""
    path = Path(input_path)
    distill = "_nodistill" if options.keep_distillation else ""
    name = formats.layout(options.format).output_name(path.stem, options.fp8_format, distill, options.shared_scales)
    return path.with_name(name + ".safetensors")


def pick_devices(options: ConvertOptions) -> list[torch.device]:
    """The compute devices: the one asked for, else every GPU (``--parallel``) or the first, else CPU."""
    if options.device:
        return [torch.device(options.device)]
    if torch.cuda.is_available():
        count = torch.cuda.device_count() if options.parallel else 1
        return [torch.device("cuda", i) for i in range(count)]
    return [torch.device("cpu")]


def compute_workers(plan: Plan, rounder: Rounder, items: list[list[str]]) -> list[torch.device]:
    """The device of each compute thread: one per device, and on a CPU one per core when weights
    are rounded with GPTQ. GPTQ runs on one thread (its column steps are too small for torch's
    thread pool), so a second weight rounded at the same time keeps the other core busy; the other
    methods use every core themselves (learned rounding's blocks) or wait for the disk (nearest)."""
    cpu = torch.device("cpu")
    if plan.devices != [cpu] or not any(rounder.method(name) == "gptq" for item in items for name in item):
        return plan.devices
    return [cpu] * max(1, min(os.cpu_count() or 1, torch.get_num_threads()))


def convert(
    source: TensorSource,
    output: str | os.PathLike,
    options: ConvertOptions,
    progress: ProgressCallback | None = None,
    check_interrupt: Callable[[], None] | None = None,
    learned_inputs: CalibrationSource | None = None,
    activity: ActivityCallback | None = None,
) -> Summary:
    """Convert ``source`` into the safetensors file ``output`` (written atomically).

    ``check_interrupt`` (raises to cancel), ``progress`` (each finished tensor) and ``activity``
    (the tensor being rounded, every half second) are called in this thread only (``job.Job``).
    ``learned_inputs``: where learned rounding draws its inputs (random, as the original script
    did, unless given). However it ends, the conversion holds no tensor on a GPU afterwards: the
    rounding's cached tables are dropped, and a failure's traceback keeps its lines but not the
    local variables of its frames (a GPU weight in a failed stage would otherwise stay allocated
    for as long as the caller keeps the exception, e.g. ComfyUI while it reports the error).
    """
    try:
        return _convert(source, output, options, progress, check_interrupt, learned_inputs, activity)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        release_tables()


def _convert(
    source: TensorSource,
    output: str | os.PathLike,
    options: ConvertOptions,
    progress: ProgressCallback | None,
    check_interrupt: Callable[[], None] | None,
    learned_inputs: CalibrationSource | None,
    activity: ActivityCallback | None,
) -> Summary:
    started = time.perf_counter()
    path = getattr(source, "path", None)
    protect = run_inputs(options, *([path] if path else []))
    check_output_path(output, options.overwrite, protect)  # before any work; checked again when writing
    inputs = input_identities(protect)  # planning reads weights and statistics: changes from here on count
    job = Job(check_interrupt, activity)
    with plan_conversion(source, options, job.poll) as plan:
        metadata = output_metadata(source, plan)
        items, entries, markers = plan.items, plan.entries, plan.markers
        if options.shard:  # a part of the output, to be joined with the others (``shards.join_shards``)
            items, entries, markers, metadata = _shard_part(plan, options.shard, metadata)
        with atomic_output(output, overwrite=options.overwrite, protect=protect, since=inputs) as file:
            writer = SafetensorsWriter(file, entries, metadata)
            for key, tensor in markers.items():
                writer.write(key, tensor)
            pool = getattr(source, "pool", None) or BufferPool()
            rounder = Rounder(plan, learned_inputs or RandomCalibration(), pool, source)
            run = _Run(source, plan, rounder, writer, job, items, progress)
            workers = compute_workers(plan, rounder, items)
            # one of the largest items (a shared-scale group) per worker in flight, and on the CPU one
            # more: read while the others are rounded or written (docs/benchmarks.md)
            on_accelerator = torch.device(getattr(source, "device", "cpu")).type != "cpu"
            budget = (len(workers) + (0 if on_accelerator else 1)) * max(map(run.cost, plan.items))
            job.estimate = Estimate(
                {name: source.tensors[name].numel for item in items for name in item if plan.decisions[name][0]}
            )
            run_pipeline(items, run.read, run.compute, run.write, workers, run.cost, run.held, budget, job)
            writer.finish()
    label = str(path) if path else "MODEL"
    return _summarise(label, output, plan, run.reports, writer.total_bytes, time.perf_counter() - started)


@dataclass
class _Run:
    """One conversion's three pipeline stages (``pipeline.run_pipeline``) and what they share."""

    source: TensorSource
    plan: Plan
    rounder: Rounder
    writer: SafetensorsWriter
    job: Job
    items: list[list[str]]
    progress: ProgressCallback | None = None
    reports: list[TensorReport] = field(default_factory=list)

    def read(self, item: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, PatternCounts]]:
        """The item's tensors, and the bit patterns of those the reader counted (``Rounder.counted``)."""
        tensors, counts = {}, {}
        for name in item:
            info = self.source.tensors[name]
            if isinstance(self.source, SafetensorsReader) and self.rounder.counted(name, info):
                counts[name] = PatternCounts(info.dtype)
                with one_cpu_thread(torch.device("cpu")):  # small steps, as round-to-nearest's
                    tensors[name] = self.source.read(name, counts[name].add)
            else:
                tensors[name] = self.source.read(name)
        return tensors, counts

    def compute(
        self, item: list[str], loaded: tuple[dict[str, torch.Tensor], dict[str, PatternCounts]], device: torch.device
    ) -> list[Converted]:
        tensors, counts = loaded
        if not self.plan.decisions[item[0]][0]:
            name = item[0]
            return [Converted({name: tensors[name]}, _report(name, self.source, self.plan, 0.0))]
        return _quantize_group(item, tensors, counts, device, self.rounder, self.source, self.job)

    def write(self, results: list[Converted]) -> None:
        total = sum(map(len, self.items))
        for result in results:
            for key, tensor in result.tensors.items():
                self.writer.write(key, tensor)
            result.report.index, result.report.total = len(self.reports) + 1, total
            self.job.finished(result.report.name)
            result.report.eta, result.report.share = self.job.eta(), self.job.share()
            self.reports.append(result.report)
            if self.progress:
                self.progress(result.report)

    def cost(self, item: list[str]) -> int:
        """An item's source bytes."""
        return sum(self.source.tensors[name].nbytes for name in item)

    @staticmethod
    def held(results: list[Converted]) -> int:
        """The bytes a computed item holds until it is written."""
        return sum(t.nbytes for result in results for t in result.tensors.values())


def run_inputs(options: ConvertOptions, *paths: str | os.PathLike) -> tuple[str | os.PathLike, ...]:
    """Every file a run reads: ``paths`` and the calibration file. None of them may become the
    output, and none may change while the run works (``atomic.atomic_output``)."""
    return (*paths, *([options.calibration] if options.calibration else []))


def output_metadata(source: TensorSource, plan: Plan) -> dict[str, str]:
    """The output header's metadata: the source's own, plus the converter's description."""
    return {**source.metadata, "quant_core": json.dumps(_describe(plan))}


SHARD_METADATA = "quant_core_shard"


def _shard_part(plan: Plan, shard: tuple[int, int], metadata: dict[str, str]) -> tuple:
    """Items, output entries, markers and metadata of shard ``k`` of ``n``: every n-th work item
    from the k-th, in a file of its own that carries the whole output's fingerprint."""
    k, n = shard
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
    learned_inputs: CalibrationSource | None = None,
    activity: ActivityCallback | None = None,
) -> Summary:
    """Convert one safetensors file; the output name defaults to ``default_output_path``."""
    options = options or ConvertOptions()
    output = Path(output_path) if output_path else default_output_path(input_path, options)
    with SafetensorsReader(input_path, BufferPool()) as reader:
        return convert(reader, output, options, progress, check_interrupt, learned_inputs, activity)


def _quantize_group(
    names: list[str],
    tensors: dict[str, torch.Tensor],
    counts: dict[str, PatternCounts],
    device: torch.device,
    rounder: Rounder,
    source: TensorSource,
    job: Job,
) -> list[Converted]:
    """Quantize a shared-scale group (or one weight) against one scale.

    The group's scale is found on the source dtype (its max is exact; from ``counts``, the bit
    patterns the reader counted, where it has them), and each member is widened to float32 only
    while it is being rounded, so the group costs its source bytes plus one float32 weight at a time.
    """
    plan = rounder.plan
    for name in names:
        tensors[name] = tensors[name].to(device)
    with one_cpu_thread(device):
        amaxes = [counts[name].absmax() if name in counts else fp8.absmax(tensors[name]) for name in names]
    for name, member_amax in zip(names, amaxes, strict=True):  # NaN and Inf both surface in a member's maximum
        if not math.isfinite(member_amax):
            fp8.check_finite(name, tensors[name])
    amax = max(amaxes)  # all finite: Python's max would pass over a NaN that is not first
    try:
        scale = plan.layout.stored_scale(fp8.scale_for(amax, plan.dtype))
    except codec.ScaleOutOfRangeError as exc:
        raise codec.ScaleOutOfRangeError(f"{', '.join(names)}: {exc}; exclude it or use format comfy") from None
    results = []
    for name in names:
        started = time.perf_counter()
        weight = tensors.pop(name)  # in its source dtype: the rounding widens one block at a time
        result, method = rounder.round(name, weight, scale, job, counts.get(name))
        layer = plan.layout.layer_tensors(name, result.quantized.cpu(), scale, plan.activations[name])
        report = _report(name, source, plan, time.perf_counter() - started)
        report.method = method
        report.error_before, report.error_after, report.fell_back = result.error_rtn, result.error, result.fell_back
        results.append(Converted(layer, report))
        del weight, result
    return results


def _report(name: str, source: TensorSource, plan: Plan, seconds: float) -> TensorReport:
    quantize, reason = plan.decisions[name]
    return TensorReport(name, 0, 0, source.tensors[name].nbytes, quantize, reason, seconds=seconds)


def _describe(plan: Plan) -> dict:
    """The converter's own header metadata: version, settings, counts."""
    quantized = sum(q for q, _ in plan.decisions.values())
    return {
        "version": __version__,
        "preset": plan.preset.name,
        "quantized": quantized,
        "kept": len(plan.decisions) - quantized,
        "input_scales": sum(a.input_scale is not None for a in plan.activations.values()),
        "full_precision": sum(a.full_precision for a in plan.activations.values()),
        "settings": plan.options.described(),
    }


def _summarise(label: str, output, plan: Plan, reports: list[TensorReport], bytes_out: int, seconds: float) -> Summary:
    order = {name: index for index, item in enumerate(plan.items) for name in item}
    reports = sorted(
        reports, key=lambda report: order.get(report.name, len(order))
    )  # several workers finish out of order
    quantized = [r for r in reports if r.quantized]
    worst = max(quantized, key=lambda r: r.error_after, default=None)
    return Summary(
        input=label,
        output=str(output),
        format=plan.options.format,
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
        max_bytes=plan.max_bytes,
        kept_layers=plan.kept,
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _size(nbytes: int) -> str:
    return f"{nbytes:,} bytes ({_gib(nbytes)})"
