"""Node widget values -> the engine's ``ConvertOptions`` (shared by both convert nodes).

The widgets are the rows of the engine's option table that the nodes show (``schema.option_inputs``);
the engine validates the result, so the nodes refuse exactly what the command line refuses.
"""

from __future__ import annotations

from ..quant_core.options import NODE, OPTION, OPTIONS, PATTERNS, ConvertOptions

_ROWS = [option for option in OPTIONS if NODE in option.fronts]
_CALIBRATION = _ROWS.index(OPTION["calibration"])  # its widgets are the nodes' own (a file list and a socket)
NODE_OPTIONS = tuple(_ROWS[:_CALIBRATION] + _ROWS[_CALIBRATION + 1 :])
# The rows after calibration come after the calibration and fp8_compute inputs too: saved workflows list
# widget values by position, so widgets added later go last.
LATE_OPTIONS = tuple(_ROWS[_CALIBRATION + 1 :])

# What ComfyUI does with the quantized layers on a GPU with fp8 compute (RTX 40xx+, H100): the choice
# the CLI makes with --input_scales and --uncalibrated_fp8_compute. The first is the default.
FP8_COMPUTE = {
    "weight-only": "dequantize and multiply in bf16/fp16, the quality measured here (safe default)",
    "calibrated": "layers with recorded statistics get an input scale and multiply in fp8 (faster)",
    "uncalibrated": "every layer multiplies in fp8 at input scale 1, inputs clipped at ±448 (loses quality)",
}


def convert_options(
    calibration: str | None = None, device: str | None = None, fp8_compute: str = "weight-only", **widgets
) -> ConvertOptions:
    """Build engine options from widget values (any subset; the rest keep the table's defaults);
    regex widgets hold one pattern per line (blank lines ignored). ``fp8_compute`` is the nodes' one
    choice for two engine settings, ``input_scales`` and ``uncalibrated_fp8_compute``."""
    if fp8_compute not in FP8_COMPUTE:
        raise ValueError(f"fp8_compute must be one of {list(FP8_COMPUTE)}, not {fp8_compute!r}")
    if fp8_compute == "calibrated" and not calibration:
        raise ValueError("fp8_compute 'calibrated' needs a calibration file (input scales come from its statistics)")
    values = {name: _lines(value) if OPTION[name].kind == PATTERNS else value for name, value in widgets.items()}
    values.update(
        calibration=calibration,
        device=device,
        input_scales=fp8_compute == "calibrated",
        uncalibrated_fp8_compute=fp8_compute == "uncalibrated",
    )
    return ConvertOptions.from_values(values)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
