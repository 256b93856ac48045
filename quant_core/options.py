"""Every conversion setting, once: the table both front ends are generated from, and its rules.

Each ``Option`` row says what a setting is called, its type, default and range, what it does in
the words a user sees (the CLI's ``--help`` and the nodes' tooltips print this same text), whether
it is basic or advanced, and which front ends show it. ``ConvertOptions`` takes its defaults from
the table, and ``ConvertOptions.validate`` checks every rule between settings, so the command line,
the nodes and Python callers all refuse the same things with the same words: messages name the
setting as the table does, never a command-line flag. The rows are in the nodes' widget order,
which saved workflows depend on (they list widget values by position): add rows after the last
node row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .budget import HELP as BUDGET_HELP
from .budget import parse_budget
from .formats import FORMATS, layout
from .fp8 import FP8_DTYPES
from .policy import AUTO, PRESETS, compile_regex

CLI, NODE = "cli", "node"
BASIC, ADVANCED = "basic", "advanced"
PATTERNS = "patterns"  # a list of regular expressions (repeatable flag; one per line in a node)

ROUNDING = {
    "auto": "GPTQ for the layers the calibration file has statistics for, round-to-nearest for the others",
    "nearest": "round-to-nearest everywhere (the original script's simple mode)",
    "learned": "GPTQ for the layers the calibration file has statistics for, learned rounding on random "
    "inputs for the others (the original script's method)",
}


@dataclass(frozen=True)
class Option:
    """One setting: a row of the table."""

    name: str  # the setting's name: ConvertOptions field, node widget, CLI flag (see ``flag``)
    kind: type | str  # str, int, float, bool, or PATTERNS
    default: Any
    help: str
    group: str = ADVANCED
    fronts: tuple[str, ...] = (CLI, NODE)
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # the node widget's increment (floats)
    flag: str = ""  # the CLI spelling where the original script's differs from ``name``
    learned: bool = False  # a setting of the learned-rounding optimiser (``ConvertOptions.learned``)
    in_metadata: bool = True  # False: changes how the file is made, never its bytes

    @property
    def cli_name(self) -> str:
        return self.flag or self.name


_LEARNED_ONLY = " (rounding: learned)"

OPTIONS: tuple[Option, ...] = (
    Option(
        "format",
        str,
        "comfy",
        "output layout: comfy (ComfyUI >= 0.4); legacy (the older FP8-scaled layout, every ComfyUI since 2024); "
        "ultra8 (8-bit "
        "scales, smaller; load it with 'Load FP8 Scaled (8-bit scales)' or decode it)",
        BASIC,
        choices=FORMATS,
    ),
    Option(
        "rounding", str, "auto", "; ".join(f"{k}: {v}" for k, v in ROUNDING.items()), BASIC, choices=tuple(ROUNDING)
    ),
    Option(
        "preset",
        str,
        AUTO,
        "model family whose sensitive layers stay in full precision (auto: detect it from the weight names)",
        BASIC,
        choices=(AUTO, *PRESETS),
    ),
    Option(
        "shared_scales",
        bool,
        True,
        "weights of one module (e.g. an attention's q/k/v/out) share one scale",
        BASIC,
        flag="use_shared_scales",
    ),
    Option("fp8_format", str, "float8_e4m3fn", "fp8 type of the weights", choices=tuple(sorted(FP8_DTYPES))),
    Option(
        "num_iter",
        int,
        200,
        "maximum optimiser iterations per tensor" + _LEARNED_ONLY,
        minimum=0,
        maximum=1_000_000,
        learned=True,
    ),
    Option(
        "calib_samples",
        int,
        96,
        "random input rows per tensor the optimiser fits on; a held-out batch of the same size checks the "
        "result" + _LEARNED_ONLY,
        minimum=1,
        maximum=8192,
        learned=True,
    ),
    Option("lr", float, 3e-2, "learning rate" + _LEARNED_ONLY, minimum=1e-5, maximum=10.0, step=1e-3, learned=True),
    Option(
        "reg_lambda",
        float,
        0.015,
        "how hard the optimiser pushes towards firm rounding decisions" + _LEARNED_ONLY,
        minimum=0.0,
        maximum=10.0,
        step=1e-3,
        learned=True,
    ),
    Option(
        "early_stop_threshold",
        float,
        5e-6,
        "stop when the loss improves less than this for 50 iterations with no decision changing" + _LEARNED_ONLY,
        fronts=(CLI,),
        minimum=0.0,
        learned=True,
    ),
    Option(
        "batch_size",
        int,
        None,
        "random input rows per matrix multiply, to bound memory (default: all at once)" + _LEARNED_ONLY,
        fronts=(CLI,),
        minimum=1,
        learned=True,
    ),
    Option(
        "use_amp",
        bool,
        True,
        "bf16 matrix multiplies in the optimiser (float32 accumulation) on CUDA and on CPUs with native bf16 "
        "(AMX, AVX-512 BF16); float32 elsewhere" + _LEARNED_ONLY,
        fronts=(CLI,),
        learned=True,
    ),
    Option(
        "min_tensor_size",
        int,
        1024,
        "quantize only weights with at least this many elements",
        minimum=0,
        maximum=2**31 - 1,
    ),
    Option(
        "text_encoders",
        bool,
        False,
        "full checkpoints: also convert the T5 / LLM text encoders inside (CLIP stays whole); off: the "
        "diffusion model only",
    ),
    Option(
        "keep_distillation",
        bool,
        False,
        "Flux-style models: keep the image and text input layers, the final output layer and the distilled "
        "guidance layers (Chroma) in full precision",
    ),
    Option(
        "t5xxl",
        bool,
        False,
        "T5-XXL text encoder: keep the layers named norm, bias, embed_tokens and shared",
        fronts=(CLI,),
    ),
    Option(
        "exclude",
        PATTERNS,
        (),
        "regular expressions: tensors matching any stay as they are",
    ),
    Option(
        "include",
        PATTERNS,
        (),
        "regular expressions: eligible weights matching any are always quantized (beats every keep rule)",
    ),
    Option(
        "seed",
        int,
        0,
        "random seed of learned rounding: the same seed and settings give the same file",
        minimum=0,
        maximum=2**31 - 1,
        learned=True,
    ),
    Option(
        "calibration",
        str,
        None,
        "input statistics recorded by 'Record FP8 Calibration' (or by a Recorder in Python): GPTQ rounding "
        "for the layers it covers (needs rounding auto or learned), and the data for calibrated input scales",
        BASIC,
    ),
    Option("max_size", str, "", BUDGET_HELP, BASIC),
    Option(
        "input_scales",
        bool,
        False,
        "write a static input scale per quantized layer from the calibration file's recorded inputs and let "
        "ComfyUI multiply those layers in fp8 on GPUs with fp8 compute (RTX 40xx+, H100); every other layer "
        "stays weight-only (full_precision_matrix_mult); format legacy needs statistics for every quantized layer",
        fronts=(CLI,),
    ),
    Option(
        "uncalibrated_fp8_compute",
        bool,
        False,
        "WARNING, loses quality: let ComfyUI multiply layers without an input scale in fp8 too, at its input "
        "scale of 1 (inputs beyond ±448 are clipped, small ones lose precision); by default they are weight-only",
        fronts=(CLI,),
    ),
    Option(
        "full_precision",
        PATTERNS,
        (),
        "regular expressions: keep matching quantized layers weight-only (full_precision_matrix_mult) even with "
        "an input scale: ComfyUI multiplies them in bf16/fp16",
        fronts=(CLI,),
    ),
    Option(
        "full_precision_above",
        float,
        None,
        "also keep weight-only the layers whose recorded inputs (calibration), rounded to fp8, are predicted "
        "to add more than this relative output error (e.g. 0.025)",
        fronts=(CLI,),
        minimum=0.0,
    ),
    Option(
        "parallel",
        bool,
        False,
        "one worker per GPU, each taking whole tensors",
        fronts=(CLI,),
        in_metadata=False,
    ),
    Option(
        "shard",
        str,
        None,
        "K/N: convert only every N-th tensor group from the K-th, into a file of its own (for several "
        "machines); join puts the N shards together into the file one run would write",
        fronts=(CLI,),
        in_metadata=False,
    ),
    Option(
        "device",
        str,
        None,
        "compute device, e.g. cpu or cuda:1 (default: the GPU when there is one)",
        fronts=(CLI,),
        in_metadata=False,
    ),
    Option("overwrite", bool, False, "replace an existing output file", fronts=(CLI,), in_metadata=False),
)
OPTION = {option.name: option for option in OPTIONS}


def _default(name: str) -> Any:
    value = OPTION[name].default
    if OPTION[name].kind == PATTERNS:
        return field(default_factory=list)
    return value


@dataclass
class LearnedOptions:
    """The learned-rounding optimiser's settings (the original script's, with its defaults)."""

    num_iter: int = _default("num_iter")
    lr: float = _default("lr")
    reg_lambda: float = _default("reg_lambda")
    calib_samples: int = _default("calib_samples")
    batch_size: int | None = _default("batch_size")
    early_stop_threshold: float = _default("early_stop_threshold")
    use_amp: bool = _default("use_amp")
    seed: int = _default("seed")


@dataclass
class ConvertOptions:
    """Every conversion setting; see ``OPTIONS`` for what each means."""

    format: str = _default("format")
    fp8_format: str = _default("fp8_format")
    rounding: str = _default("rounding")
    learned: LearnedOptions = field(default_factory=LearnedOptions)
    shared_scales: bool = _default("shared_scales")
    min_tensor_size: int = _default("min_tensor_size")
    preset: str = _default("preset")
    include: list[str] = _default("include")
    exclude: list[str] = _default("exclude")
    t5xxl: bool = _default("t5xxl")
    keep_distillation: bool = _default("keep_distillation")
    text_encoders: bool = _default("text_encoders")
    calibration: str | None = _default("calibration")
    max_size: str = _default("max_size")
    input_scales: bool = _default("input_scales")
    uncalibrated_fp8_compute: bool = _default("uncalibrated_fp8_compute")
    full_precision: list[str] = _default("full_precision")
    full_precision_above: float | None = _default("full_precision_above")
    parallel: bool = _default("parallel")
    shard: tuple[int, int] | None = _default("shard")  # (k, n), 1-based
    device: str | None = _default("device")
    overwrite: bool = _default("overwrite")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ConvertOptions:
        """Options from a front end's values keyed by the table's names (any subset); validated."""
        unknown = sorted(set(values) - set(OPTION))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the settings are {list(OPTION)}")
        learned = {k: v for k, v in values.items() if OPTION[k].learned}
        others = {k: list(v) if OPTION[k].kind == PATTERNS else v for k, v in values.items() if not OPTION[k].learned}
        options = cls(**others, learned=LearnedOptions(**learned))
        options.validate()
        return options

    def value(self, name: str) -> Any:
        """A setting by its table name (the learned ones live in ``learned``)."""
        return getattr(self.learned if OPTION[name].learned else self, name)

    def validate(self) -> None:
        """Refuse every setting, and every combination of settings, the engine cannot honour."""
        for option in OPTIONS:
            _check_value(option, self.value(option.name))
        for name in ("include", "exclude", "full_precision"):
            for pattern in self.value(name):
                compile_regex(pattern, name)
        layout(self.format).check_fp8(FP8_DTYPES[self.fp8_format])
        parse_budget(self.max_size)
        if self.shard is not None and not (len(self.shard) == 2 and 1 <= self.shard[0] <= self.shard[1]):
            raise ValueError(f"shard {self.shard}: K/N needs 1 <= K <= N")
        uses_statistics = self.input_scales or self.full_precision_above is not None
        if uses_statistics and not self.calibration:
            raise ValueError(
                "input_scales and full_precision_above need a calibration file (recorded input statistics)"
            )
        if self.calibration and self.rounding == "nearest" and not uses_statistics:
            raise ValueError(
                "a calibration file needs rounding 'auto' or 'learned' (GPTQ for the recorded layers); with "
                "rounding 'nearest' it would be ignored"
            )

    def described(self) -> dict[str, Any]:
        """The settings that decide the output's bytes, for its metadata (the optimiser's only
        when it runs)."""
        settings = asdict(self)
        for option in OPTIONS:
            if not option.in_metadata:
                settings.pop(option.name)
        if self.rounding != "learned":
            settings.pop("learned")
        return settings


def _check_value(option: Option, value: Any) -> None:
    if value is None and option.default is None:
        return
    if option.choices and value not in option.choices:
        raise ValueError(f"{option.name} must be one of {list(option.choices)}, not {value!r}")
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"{option.name} must be at least {option.minimum:g}, not {value!r}")
    if option.maximum is not None and value > option.maximum:
        raise ValueError(f"{option.name} must be at most {option.maximum:g}, not {value!r}")
