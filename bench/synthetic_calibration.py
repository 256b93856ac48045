"""A calibration file of the right shapes for a generated checkpoint, for timing calibrated rounding.

    python bench/synthetic_calibration.py CHECKPOINT OUTPUT [--rank 128]

A real recording needs the real model running; to time ``--calibration`` on a generated
checkpoint (e.g. Flux-dev's shapes, 24 GB) this writes what ``Recorder`` would write for layers
wider than its exact limit — a rank-``r`` factor, the exact diagonal and ``r`` held-out rows per
2-D weight — with random but structured contents: a decaying spectrum plus a per-channel
residual, held-out rows drawn from the same distribution. The file is streamed (one layer in
memory at a time), like the converter's own output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quant_core.calibration import (  # noqa: E402
    STATISTICS_METADATA,
    LayerStatistics,
    LowRankGram,
    RowSample,
    statistics_tensors,
)
from quant_core.io import SafetensorsReader, TensorInfo, write_stream  # noqa: E402


def layer_statistics(in_features: int, rank: int, seed: int) -> LayerStatistics:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(in_features, rank, generator=generator) * torch.arange(1, rank + 1) ** -0.5
    residual = 0.05 * factor.square().sum(1).mean() * torch.rand(in_features, generator=generator)
    mixing = torch.randn(rank, rank, generator=generator)
    heldout = mixing @ factor.T + torch.randn(rank, in_features, generator=generator) * residual.sqrt()
    fit = LowRankGram(factor, factor.square().sum(1) + residual)
    return LayerStatistics(fit, RowSample(heldout), 4096, 4096, 10.0)


def shapes_only(in_features: int, rank: int) -> LayerStatistics:
    """The same layout without data (meta tensors), to lay out the file's header first."""
    meta = {"device": "meta"}
    fit = LowRankGram(torch.empty(in_features, rank, **meta), torch.empty(in_features, **meta))
    return LayerStatistics(fit, RowSample(torch.empty(rank, in_features, **meta)), 0, 0, 0.0)


def write_synthetic_calibration(checkpoint: Path, output: Path, rank: int = 128) -> int:
    """Statistics for every 2-D floating-point weight of ``checkpoint``; returns the bytes written."""
    with SafetensorsReader(checkpoint) as reader:
        layers = [
            (name, info.shape[1])
            for name, info in reader.tensors.items()
            if len(info.shape) == 2 and info.dtype.is_floating_point and name.endswith(".weight")
        ]
    entries = [
        TensorInfo(key, tensor.dtype, tuple(tensor.shape))
        for name, width in layers
        for key, tensor in statistics_tensors(name, shapes_only(width, rank)).items()
    ]
    stream = (
        item
        for seed, (name, width) in enumerate(layers)
        for item in statistics_tensors(name, layer_statistics(width, rank, seed)).items()
    )
    write_stream(output, entries, stream, STATISTICS_METADATA)
    return output.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    size = write_synthetic_calibration(args.checkpoint, args.output, args.rank)
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
