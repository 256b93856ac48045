"""What the convert nodes do, free of the node API: pick paths, wire progress, run the engine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..quant_core.convert import ConvertOptions, Summary, TensorSource, convert
from ..quant_core.inspection import inspect_file
from ..quant_core.io import SafetensorsReader
from . import host
from .model_source import ModelSource

WORST_LAYERS = 5
CHECKED = "checked   the written file read back and meets ComfyUI's loader contract"


def convert_model(
    model, options: ConvertOptions, filename_prefix: str, prompt=None, extra_pnginfo=None, node_id=None
) -> Summary:
    """Convert a MODEL (patches baked in) into the diffusion-models folder (``host.save_folder``)."""
    with _reported(node_id):
        output = host.save_path(filename_prefix, "diffusion_models")
        device = host.torch_device()
        options.device = options.device or str(device)
        source = ModelSource(model, device, host.save_metadata(prompt, extra_pnginfo))
        return _run(source, output, options, node_id)


def convert_checkpoint(
    entry: str, options: ConvertOptions, filename_prefix: str, prompt=None, extra_pnginfo=None, node_id=None
) -> Summary:
    """Convert a file picked as ``folder/name``, streamed from disk, into the model folder it was found in."""
    with _reported(node_id):
        folder, path = host.resolve_source(entry)
        output = host.save_path(filename_prefix, folder, source=path)
        options.device = options.device or str(host.torch_device())
        with SafetensorsReader(path) as reader:
            reader.metadata.update(host.save_metadata(prompt, extra_pnginfo))
            return _run(reader, output, options, node_id)


def report_text(summary: Summary) -> str:
    """The node's text output: the engine's summary, that the file was checked (every summary
    the nodes report passed ``_check_written``), and the layers with the largest error."""
    worst = _worst(summary)
    lines = [summary.text(), CHECKED]
    if worst:
        lines.append("worst layers (weight: relative weight error; output: on held-out inputs):")
        lines += [f"  {r.error_after:.3%} {r.measure:6}  {r.name}" for r in worst]
    return "\n".join(lines)


@contextlib.contextmanager
def _reported(node_id) -> Iterator[None]:
    """Tell the web extension about any failure (setup included) and free GPU memory either way."""
    try:
        yield
    except BaseException as exc:  # ComfyUI's interrupt is a BaseException: report it, then re-raise
        cancelled = not isinstance(exc, Exception)
        host.send("error", {"node": node_id, "cancelled": cancelled, "message": str(exc) or type(exc).__name__})
        raise
    finally:
        host.free_memory()


def _run(source: TensorSource, output: Path, options: ConvertOptions, node_id) -> Summary:
    progress = host.NodeProgress(node_id, len(source.tensors))
    summary = convert(
        source,
        output,
        options,
        progress=progress,
        check_interrupt=host.check_interrupt,
        activity=progress.activity,
    )
    _check_written(output)
    host.send("done", _done_event(summary, node_id))
    return summary


def _check_written(output: Path) -> None:
    """Read the written file back and check it against the loader contract before reporting
    success (``inspect``: headers, scales, layer descriptions). A file that fails is removed: the
    node writes new numbered files only, so it removes nothing but its own broken output."""
    violations = inspect_file(str(output)).violations
    if violations:
        output.unlink()
        raise RuntimeError(
            f"the written file {output.name} failed the loader-contract check and was removed: "
            + "; ".join(violations[:3])
        )


def _worst(summary: Summary) -> list:
    return sorted((r for r in summary.reports if r.quantized), key=lambda r: -r.error_after)[:WORST_LAYERS]


def _done_event(summary: Summary, node_id) -> dict:
    return {
        "node": node_id,
        "output": summary.output,
        "bytes_in": summary.bytes_in,
        "bytes_out": summary.bytes_out,
        "quantized": summary.quantized,
        "kept": summary.kept,
        "mean_error": summary.mean_error,
        "errors": summary.errors(),
        "worst": [[r.name, r.error_after, r.measure] for r in _worst(summary)],
        "fallbacks": summary.fallbacks,
        "seconds": round(summary.seconds, 2),
        "preset": summary.preset,
    }
