"""Command line: ``python -m quant_core [convert] --input FILE …`` and the companion commands.

The seed script's options are accepted under both spellings users type (``--use_amp`` and
``--use-amp``); ``convert`` is the default command, so the seed's command lines work unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, formats
from .convert import ROUNDING_METHODS, ConvertOptions, convert_file, default_output_path
from .decode import decode_file
from .example import flux_shapes, write_synthetic
from .fp8 import FP8_DTYPES
from .inspection import inspect_file, verify_files
from .policy import AUTO, PRESETS
from .progress import ProgressBar
from .rounding import RoundingOptions
from .shards import join_shards
from .signals import Stopped, stop_on_signals

COMMANDS = ("convert", "join", "inspect", "verify", "decode", "example")


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register ``--name_with_underscores`` together with its dashed spelling."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core [convert]",
        description="Convert a safetensors checkpoint to FP8-scaled weights: calibrated, nearest or learned rounding.",
    )
    defaults = RoundingOptions()
    _option(parser, "input", required=True, help="input .safetensors file")
    _option(parser, "output", help="output file (default: a name derived from the input, beside it)")
    _option(
        parser,
        "format",
        choices=formats.FORMATS,
        default="comfy",
        help="output layout: comfy (ComfyUI >= 0.4), legacy (scaled_fp8), ultra8 (8-bit scales)",
    )
    _option(parser, "fp8_format", choices=sorted(FP8_DTYPES), default="float8_e4m3fn", help="fp8 weight type")
    _option(
        parser,
        "rounding",
        choices=list(ROUNDING_METHODS),
        default="auto",
        help="; ".join(f"{name}: {what}" for name, what in ROUNDING_METHODS.items()),
    )
    _option(parser, "simple", action="store_true", help="the seed's flag for --rounding nearest")
    _option(parser, "t5xxl", action="store_true", help="T5XXL: keep layers named norm, bias, embed_tokens, shared")
    _option(
        parser,
        "keep_distillation",
        action="store_true",
        help="keep distilled_guidance_layer, final_layer, img_in, txt_in in source precision",
    )
    _option(
        parser,
        "text_encoders",
        action="store_true",
        help="full checkpoints: also convert the T5 / LLM text encoders inside (default: the diffusion model only)",
    )
    _option(
        parser,
        "preset",
        choices=[AUTO, *PRESETS],
        default=AUTO,
        help="model family whose sensitive layers stay in high precision (auto: detect from key names)",
    )
    _option(
        parser,
        "include",
        action="append",
        default=[],
        metavar="REGEX",
        help="always quantize eligible weights matching REGEX (repeatable; beats every keep rule)",
    )
    _option(
        parser,
        "exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="never quantize tensors matching REGEX (repeatable)",
    )
    _option(parser, "min_tensor_size", type=int, default=1024, help="quantize only weights with this many elements")
    _option(
        parser,
        "calib_samples",
        type=int,
        default=defaults.calib_samples,
        help="calibration input rows per tensor (a held-out batch of the same size checks the result)",
    )
    _option(parser, "num_iter", type=int, default=defaults.num_iter, help="maximum optimiser iterations per tensor")
    _option(parser, "lr", type=float, default=defaults.lr, help="Adam learning rate (cosine schedule)")
    _option(parser, "reg_lambda", type=float, default=defaults.reg_lambda, help="rounding regulariser strength")
    _option(
        parser,
        "early_stop_threshold",
        type=float,
        default=defaults.early_stop_threshold,
        help="stop when the loss improves less than this for 50 iterations with no decision changing",
    )
    _option(parser, "batch_size", type=int, default=None, help="calibration rows per matrix multiply (memory)")
    _option(
        parser,
        "use_amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 matrix multiplies in the optimiser on CUDA and on CPUs with native bf16 (AMX, AVX-512 BF16)",
    )
    _option(
        parser,
        "use_shared_scales",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weights of one module (e.g. an attention's q/k/v/out) share one scale",
    )
    _option(
        parser,
        "calibration",
        metavar="FILE",
        help="input statistics recorded with quant_core.calibration.Recorder: GPTQ rounding for the weights "
        "it covers (see --rounding for the others)",
    )
    _option(
        parser,
        "input_scales",
        action="store_true",
        help="write a static input_scale per quantized layer from the --calibration file's input absolute "
        "maximum and let ComfyUI multiply those layers in fp8 on GPUs with fp8 compute (RTX 40xx+, H100); "
        "every other layer stays weight-only (full_precision_matrix_mult). --format legacy needs statistics "
        "for every quantized layer",
    )
    _option(
        parser,
        "uncalibrated_fp8_compute",
        action="store_true",
        help="WARNING, loses quality: let ComfyUI multiply layers without an input scale in fp8 too, at its "
        "input scale of 1 (inputs beyond ±448 are clipped, small ones lose precision); by default they are "
        "weight-only",
    )
    _option(
        parser,
        "full_precision",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep quantized layers matching REGEX weight-only (full_precision_matrix_mult) even with an input "
        "scale: ComfyUI multiplies them in bf16/fp16 (repeatable)",
    )
    _option(
        parser,
        "full_precision_above",
        type=float,
        metavar="X",
        help="also keep weight-only the layers whose recorded inputs (--calibration), rounded to fp8, are "
        "predicted to add more than X relative output error (e.g. 0.025)",
    )
    _option(
        parser,
        "parallel",
        action="store_true",
        help="one worker per GPU, each taking whole tensors (reading, rounding and writing always overlap)",
    )
    _option(
        parser,
        "shard",
        type=_shard,
        metavar="K/N",
        help="convert only every N-th tensor group from the K-th, into a file of its own (for several "
        "machines); `join` puts the N shards together into the file one run would write",
    )
    _option(parser, "seed", type=int, default=0, help="random seed: the same seed gives the same file")
    _option(parser, "device", help="compute device, e.g. cpu or cuda:1 (default: CUDA when available)")
    _option(parser, "overwrite", action="store_true", help="replace an existing output file")
    _option(parser, "quiet", action="store_true", help="no progress bar")
    return parser


def _shard(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 1/4, not {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"{text}: K must be between 1 and N")
    return k, n


def options_from(args: argparse.Namespace) -> ConvertOptions:
    for name in ("calib_samples", "num_iter", "min_tensor_size"):
        if getattr(args, name) < (0 if name != "calib_samples" else 1):
            raise SystemExit(f"error: --{name} must be {'positive' if name == 'calib_samples' else '>= 0'}")
    rounding = RoundingOptions(
        num_iter=args.num_iter,
        lr=args.lr,
        reg_lambda=args.reg_lambda,
        calib_samples=args.calib_samples,
        batch_size=args.batch_size,
        early_stop_threshold=args.early_stop_threshold,
        use_amp=args.use_amp,
        seed=args.seed,
    )
    return ConvertOptions(
        format=args.format,
        fp8_format=args.fp8_format,
        method=_rounding_method(args),
        rounding=rounding,
        shared_scales=args.use_shared_scales,
        min_tensor_size=args.min_tensor_size,
        preset=args.preset,
        include=args.include,
        exclude=args.exclude,
        t5xxl=args.t5xxl,
        keep_distillation=args.keep_distillation,
        text_encoders=args.text_encoders,
        calibration=args.calibration,
        input_scales=args.input_scales,
        uncalibrated_fp8_compute=args.uncalibrated_fp8_compute,
        full_precision=args.full_precision,
        full_precision_above=args.full_precision_above,
        parallel=args.parallel,
        shard=getattr(args, "shard", None),
        device=args.device,
        overwrite=args.overwrite,
    )


def _rounding_method(args: argparse.Namespace) -> str:
    if args.simple and args.rounding not in ("auto", "nearest"):
        raise ValueError(f"--simple (round-to-nearest) contradicts --rounding {args.rounding}")
    return "nearest" if args.simple else args.rounding


def run_convert(argv: Sequence[str]) -> int:
    args = convert_parser().parse_args(argv)
    options = options_from(args)
    progress = None if args.quiet else ProgressBar("convert")
    output = args.output
    if options.shard and not output:
        whole = default_output_path(args.input, options)
        output = whole.with_name(f"{whole.stem}.shard{options.shard[0]}of{options.shard[1]}.safetensors")
    activity = progress.activity if progress else None
    summary = convert_file(args.input, output, options, progress=progress, activity=activity)
    print(summary.text())
    return 0


def run_join(argv: Sequence[str]) -> int:
    parser = convert_parser()
    parser.prog = "python -m quant_core join"
    parser.description = (
        "Put the shards of `convert --shard K/N` together into the file one run would write; give the "
        "input and the options the shards were converted with."
    )
    parser.add_argument("shards", nargs="+", help="the shard files")
    args = parser.parse_args(argv)
    if args.shard:
        raise ValueError("join takes the shard files, not --shard")
    print(join_shards(args.input, args.shards, args.output, options_from(args)))
    return 0


def run_inspect(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core inspect", description="Show a safetensors file's format, dtypes, sizes and scales."
    )
    parser.add_argument("file")
    parser.add_argument("--layers", action="store_true", help="list every quantized layer")
    args = parser.parse_args(argv)
    report = inspect_file(args.file)
    print(report.text(errors=args.layers))
    return 1 if report.violations else 0


def run_verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core verify",
        description="Per-layer error of a converted file against its original; exit 1 on contract violations.",
    )
    parser.add_argument("original")
    parser.add_argument("converted")
    args = parser.parse_args(argv)
    report = verify_files(args.original, args.converted)
    print(report.text(errors=True))
    print("verify: " + (f"{len(report.violations)} violations" if report.violations else "contract OK"))
    return 1 if report.violations else 0


def run_decode(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core decode",
        description="Turn an ultra8 file into comfy or legacy layout for stock loaders.",
    )
    parser.add_argument("file")
    parser.add_argument("--to", choices=("comfy", "legacy"), default="comfy")
    parser.add_argument("--output")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(decode_file(args.file, args.output, args.to, args.overwrite))
    return 0


def run_example(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core example",
        description="Generate a small Flux-shaped checkpoint, convert it with the default settings, verify it.",
    )
    parser.add_argument("--dir", default="example_output", help="folder for the example files")
    args = parser.parse_args(argv)
    source = write_synthetic(Path(args.dir) / "flux_tiny_bf16.safetensors", flux_shapes())
    print(f"wrote the example checkpoint {source}")
    output = default_output_path(source, ConvertOptions())
    summary = convert_file(source, output, ConvertOptions(overwrite=True), progress=ProgressBar("convert"))
    print(summary.text())
    return run_verify([str(source), str(output)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"quant_core {__version__}")
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "convert"
    runners = {
        "convert": run_convert,
        "join": run_join,
        "inspect": run_inspect,
        "verify": run_verify,
        "decode": run_decode,
        "example": run_example,
    }
    try:
        with stop_on_signals():
            return runners[command](argv)
    except Stopped as exc:  # SIGTERM, SIGHUP: cleaned up like Ctrl-C
        print(f"{exc}; no output was written", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
