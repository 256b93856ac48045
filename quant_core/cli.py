"""Command line: ``python -m quant_core [convert] --input FILE …`` and the companion commands.

The convert flags are generated from the engine's option table (``options.OPTIONS``). The original
script's options are accepted under both spellings users type (``--use_amp`` and ``--use-amp``),
and ``convert`` is the default command, so its command lines work unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .convert import convert_file, default_output_path
from .decode import decode_file, targets
from .example import flux_shapes, write_synthetic
from .inspection import inspect_file, verify_files
from .options import CLI, OPTIONS, PATTERNS, ConvertOptions, Option
from .progress import ProgressBar
from .shards import join_shards
from .signals import Stopped, stop_on_signals

COMMANDS = ("convert", "join", "inspect", "verify", "decode", "example")


def _option(parser: argparse.ArgumentParser, name: str, dest: str | None = None, **kwargs) -> None:
    """Register ``--name_with_underscores`` together with its dashed spelling."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=dest or name, **kwargs)


def _table_option(parser: argparse.ArgumentParser, option: Option) -> None:
    """One row of the option table as a flag; the engine checks ranges and combinations."""
    kwargs: dict = {"help": option.help.replace("%", "%%"), "default": option.default}  # argparse formats help
    if option.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if option.default else "store_true"
    elif option.kind == PATTERNS:
        kwargs.update(action="append", default=[], metavar="REGEX", help=kwargs["help"] + " (repeatable)")
    elif option.name == "shard":
        kwargs.update(type=_parse_shard, metavar="K/N")
    elif option.name == "calibration":
        kwargs["metavar"] = "FILE"
    elif option.name == "max_size":
        kwargs["metavar"] = "SIZE"
    else:
        kwargs["type"] = option.kind
        if option.kind in (int, float):
            kwargs["metavar"] = "N" if option.kind is int else "X"
    if option.choices:
        kwargs["choices"] = option.choices
    _option(parser, option.cli_name, dest=option.name, **kwargs)


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quant_core [convert]",
        description="Convert a safetensors checkpoint to FP8-scaled weights: calibrated, nearest or learned rounding.",
    )
    _option(parser, "input", required=True, help="input .safetensors file")
    _option(parser, "output", help="output file (default: a name derived from the input, beside it)")
    _option(parser, "simple", action="store_true", help="the original script's flag for --rounding nearest")
    for option in OPTIONS:
        if CLI in option.fronts:
            _table_option(parser, option)
    _option(parser, "quiet", action="store_true", help="no progress bar")
    return parser


def _parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, e.g. 1/4, not {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"{text}: K must be between 1 and N")
    return k, n


def options_from(args: argparse.Namespace) -> ConvertOptions:
    """The parsed flags as engine options (validated by the engine)."""
    values = {option.name: getattr(args, option.name) for option in OPTIONS if CLI in option.fronts}
    values["rounding"] = _rounding(args)
    return ConvertOptions.from_values(values)


def _rounding(args: argparse.Namespace) -> str:
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
    parser.add_argument("--to", choices=targets(), default=targets()[0])
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
