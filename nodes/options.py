"""Node widget values -> the engine's ``ConvertOptions`` (shared by both convert nodes).

The widgets are the rows of the engine's option table that the nodes show (``schema.option_inputs``);
the engine validates the result, so the nodes refuse exactly what the command line refuses.
"""

from __future__ import annotations

from ..quant_core.options import NODE, OPTION, OPTIONS, PATTERNS, ConvertOptions

NODE_OPTIONS = tuple(option for option in OPTIONS if NODE in option.fronts and option.name != "calibration")


def convert_options(calibration: str | None = None, device: str | None = None, **widgets) -> ConvertOptions:
    """Build engine options from widget values (any subset; the rest keep the table's defaults);
    regex widgets hold one pattern per line (blank lines ignored)."""
    values = {name: _lines(value) if OPTION[name].kind == PATTERNS else value for name, value in widgets.items()}
    return ConvertOptions.from_values({**values, "calibration": calibration, "device": device})


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
