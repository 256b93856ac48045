"""Node widget values -> the engine's ``ConvertOptions`` (shared by both convert nodes)."""

from __future__ import annotations

from ..quant_core.convert import ROUNDING_METHODS, ConvertOptions
from ..quant_core.rounding import RoundingOptions


def convert_options(
    format: str = "comfy",
    fp8_format: str = "float8_e4m3fn",
    rounding: str = "auto",
    num_iter: int = 200,
    calib_samples: int = 96,
    lr: float = 3e-2,
    reg_lambda: float = 0.015,
    shared_scales: bool = True,
    min_tensor_size: int = 1024,
    preset: str = "auto",
    exclude: str = "",
    include: str = "",
    keep_distillation: bool = False,
    t5xxl: bool = False,
    text_encoders: bool = False,
    seed: int = 0,
    device: str | None = None,
    calibration: str | None = None,
) -> ConvertOptions:
    """Build engine options; regex widgets hold one pattern per line (blank lines ignored)."""
    if rounding not in ROUNDING_METHODS:
        raise ValueError(f"rounding must be one of {list(ROUNDING_METHODS)}, not {rounding!r}")
    return ConvertOptions(
        format=format,
        fp8_format=fp8_format,
        method=rounding,
        rounding=RoundingOptions(
            num_iter=num_iter, lr=lr, reg_lambda=reg_lambda, calib_samples=calib_samples, seed=seed
        ),
        shared_scales=shared_scales,
        min_tensor_size=min_tensor_size,
        preset=preset,
        include=_lines(include),
        exclude=_lines(exclude),
        t5xxl=t5xxl,
        keep_distillation=keep_distillation,
        text_encoders=text_encoders,
        device=device,
        calibration=calibration,
    )


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]
