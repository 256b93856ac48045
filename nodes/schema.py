"""The node classes (ComfyUI schema API, pinned to ``comfy_api.v0_0_2``): widgets in, engine call, outputs.

Each ``execute`` only translates widgets into a call of ``conversion``, ``loading`` or the engine's
``inspection``; the behaviour lives there, where it is tested without ComfyUI.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..quant_core.inspection import inspect_file
from ..quant_core.options import ADVANCED, OPTION, PATTERNS, Option
from . import conversion, host
from .loading import load_fp8_model
from .options import FP8_COMPUTE, LATE_OPTIONS, NODE_OPTIONS, convert_options
from .recording import record_model, record_text_encoder, save_recording

CATEGORY = "quantization/fp8"
ALIASES = ["fp8", "quantize", "scaled fp8", "compress model", "fp8 scaled", "convert"]
CALIBRATION_ALIASES = ["calibration", "record activations", "gptq", *ALIASES]
Recording = io.Custom("FP8_CALIBRATION_RECORDING")
RECORDED_LAYERS = ("quantized", "all")
FLOAT_ROUND = 1e-5  # the precision float widgets keep


def _calibration_inputs() -> list:
    """Statistics recorded by 'Record FP8 Calibration': GPTQ rounding for the weights they cover."""
    return [
        io.Combo.Input(
            "calibration",
            options=host.calibration_files(),
            default=host.NO_CALIBRATION,
            optional=True,
            tooltip=f"a file from models/{host.CALIBRATION_FOLDER}: {OPTION['calibration'].help}",
        ),
        io.String.Input(
            "calibration_path",
            optional=True,
            force_input=True,
            tooltip="the 'path' output of 'Save FP8 Calibration' (saved in the same run); overrides calibration",
        ),
    ]


def option_inputs(late: bool = False) -> list:
    """The engine's option table as widgets: its defaults, ranges and help; advanced rows folded.
    ``late``: the rows after calibration (``options.LATE_OPTIONS``), optional so that prompts saved
    before they existed keep the default; else those before."""
    return [_widget(option, late) for option in NODE_OPTIONS if (option in LATE_OPTIONS) == late]


def _widget(option: Option, optional: bool = False) -> io.Input:
    common = {
        "default": option.default,
        "tooltip": option.help,
        "advanced": option.group == ADVANCED or None,
        "optional": optional or None,
    }
    common = {key: value for key, value in common.items() if value is not None}
    if option.choices:
        return io.Combo.Input(option.name, options=list(option.choices), **common)
    if option.kind is bool:
        return io.Boolean.Input(option.name, **common)
    if option.kind is int:
        extra = {"control_after_generate": False} if option.name == "seed" else {}  # reproducible, not re-rolled
        return io.Int.Input(option.name, min=option.minimum, max=option.maximum, **extra, **common)
    if option.kind is float:
        return io.Float.Input(
            option.name, min=option.minimum, max=option.maximum, step=option.step, round=FLOAT_ROUND, **common
        )
    if option.kind is str:
        return io.String.Input(option.name, **common)
    if option.kind == PATTERNS:
        tooltip = f"{option.help} (one per line)"
        return io.String.Input(option.name, multiline=True, **{**common, "default": "", "tooltip": tooltip})
    raise TypeError(f"no node widget for the option {option.name} of kind {option.kind}")


def _convert_schema(node_id: str, display_name: str, description: str, source: io.Input) -> io.Schema:
    """The two convert nodes differ only in what they read from."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=CATEGORY,
        search_aliases=ALIASES,
        description=description,
        inputs=[
            source,
            io.String.Input(
                "filename_prefix",
                default="fp8_scaled/ComfyUI",
                tooltip="name of the saved file in the model folder ('/' makes subfolders, _00001_ is added); a "
                "converted file goes next to its source when that lies in a model folder",
            ),
            *option_inputs(),
            *_calibration_inputs(),  # after the options: saved UI workflows list widget values by position
            io.Combo.Input(
                "fp8_compute",
                options=list(FP8_COMPUTE),
                default="weight-only",
                optional=True,  # prompts saved before it existed keep the safe default
                tooltip="what GPUs with fp8 compute (RTX 40xx and later, H100) do with the quantized layers. "
                + "; ".join(f"{k}: {v}" for k, v in FP8_COMPUTE.items()),
            ),
            *option_inputs(late=True),
        ],
        outputs=[io.String.Output("path"), io.String.Output("report")],
        hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
        is_output_node=True,
    )


def _convert(node: type[io.ComfyNode], action, source, filename_prefix: str, options: dict) -> io.NodeOutput:
    """Run a conversion with the node's hidden inputs; output the path and the report, shown on the node."""
    hidden = node.hidden
    calibration = host.resolve_calibration(
        options.pop("calibration", host.NO_CALIBRATION), options.pop("calibration_path", None)
    )
    engine_options = convert_options(**options, calibration=str(calibration) if calibration else None)
    summary = action(source, engine_options, filename_prefix, hidden.prompt, hidden.extra_pnginfo, hidden.unique_id)
    report = conversion.report_text(summary)
    return io.NodeOutput(summary.output, report, ui=ui.PreviewText(report))


class ConvertModelToFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _convert_schema(
            "FP8ScaledConvertModel",
            "Convert to FP8 Scaled",
            "Bakes the MODEL's patches (LoRAs…) in, one weight at a time, and saves FP8-scaled weights into the "
            "diffusion_models folder, where 'Load Diffusion Model' lists them.",
            io.Model.Input(
                "model",
                tooltip="the MODEL to convert, with the patches applied to it (e.g. by 'LoraLoaderModelOnly')",
            ),
        )

    @classmethod
    def execute(cls, model, filename_prefix, **options) -> io.NodeOutput:
        return _convert(cls, conversion.convert_model, model, filename_prefix, options)


class ConvertCheckpointFileToFP8(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _convert_schema(
            "FP8ScaledConvertFile",
            "Convert Checkpoint File to FP8 Scaled",
            "Streams a .safetensors file from disk (no model is loaded) and saves the FP8-scaled file into the "
            "same kind of folder.",
            io.Combo.Input(
                "source", options=host.source_files(), tooltip="diffusion_models/, checkpoints/ or text_encoders/ file"
            ),
        )

    @classmethod
    def execute(cls, source, filename_prefix, **options) -> io.NodeOutput:
        return _convert(cls, conversion.convert_checkpoint, source, filename_prefix, options)


class LoadFP8Scaled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="FP8ScaledLoad",
            display_name="Load FP8 Scaled (8-bit scales)",
            category=CATEGORY,
            search_aliases=["load fp8", "ultra8", *ALIASES],
            description="Loads an ultra8 file (uint8 scales are decoded for ComfyUI's own fp8 ops), or a "
            "comfy / legacy FP8-scaled file, as a MODEL.",
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="an FP8-scaled file in the diffusion_models folder (ultra8, comfy or legacy layout)",
                )
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name) -> io.NodeOutput:
        import folder_paths

        return io.NodeOutput(load_fp8_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name)))


class InspectFP8Scaled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FP8ScaledInspect",
            display_name="Inspect FP8 Scaled File",
            category=CATEGORY,
            search_aliases=["inspect", "safetensors info", *ALIASES],
            description="Format, tensor counts, dtypes, sizes and scale statistics of a model file, and any "
            "violation of ComfyUI's loader contract.",
            inputs=[
                io.Combo.Input(
                    "source",
                    options=[host.NO_SOURCE, *host.source_files()],
                    default=host.NO_SOURCE,
                    tooltip="the model file to inspect; none: the file connected to 'path'",
                ),
                io.String.Input(
                    "path",
                    optional=True,
                    force_input=True,
                    tooltip="a file path, e.g. a convert node's 'path' output; overrides source",
                ),
            ],
            outputs=[io.String.Output("report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, source, path=None) -> io.NodeOutput:
        if not path and source == host.NO_SOURCE:
            raise host.UserError("pick a file in 'source' or connect a convert node's 'path' output")
        file = host.resolve_model_file(path) if path else host.resolve_source(source)[1]
        text = inspect_file(str(file)).text(errors=True)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class RecordFP8Calibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FP8ScaledRecordCalibration",
            display_name="Record FP8 Calibration",
            category=CATEGORY,
            search_aliases=CALIBRATION_ALIASES,
            description="Sample with the MODEL output as usual: every run of it records what each Linear layer of "
            "the diffusion model sees, for GPTQ rounding on your own prompts. The input MODEL is not recorded. "
            "Save the recording with 'Save FP8 Calibration'.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="the MODEL to sample with; sample with this node's MODEL output to record",
                ),
                _recording_memory_input(),
                _recorded_layers_input(" (the model's preset keeps e.g. embedders and final layers)"),
            ],
            outputs=[io.Model.Output(), Recording.Output("recording")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, max_memory_mib, layers) -> io.NodeOutput:
        return io.NodeOutput(*record_model(model, max_memory_mib, cls.hidden.unique_id, layers == "all"))


def _recording_memory_input():
    """The recording nodes' memory cap (diffusion model and text encoders alike)."""
    return io.Int.Input(
        "max_memory_mib",
        default=4096,
        min=16,
        max=2**20,
        tooltip="memory the recording may hold (CPU); layers first seen after the cap are not recorded",
    )


def _recorded_layers_input(kept: str = ""):
    """Which layers the recording nodes record; ``kept`` says what the family's preset keeps."""
    return io.Combo.Input(
        "layers",
        options=list(RECORDED_LAYERS),
        default="quantized",
        tooltip=f"quantized: the layers the converter quantizes at its default settings{kept}; all: every Linear "
        "layer, for conversions with include regexes or another preset",
    )


class RecordFP8TextEncoderCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FP8ScaledRecordTextEncoderCalibration",
            display_name="Record FP8 Text Encoder Calibration",
            category=CATEGORY,
            search_aliases=CALIBRATION_ALIASES,
            description="Encode your prompts with the CLIP output as usual (CLIPTextEncode): every encoding records "
            "what each Linear layer of the text encoders (T5, UMT5, Qwen, Mistral, Gemma, Llama) sees, for GPTQ "
            "rounding of their text_encoders/ file. The input CLIP is not recorded; CLIP-L/G are kept whole by the "
            "converter and have nothing to record. Save with 'Save FP8 Calibration'. Text encoders get no input "
            "scales: ComfyUI multiplies them in full precision.",
            inputs=[
                io.Clip.Input(
                    "clip",
                    tooltip="the CLIP to encode your prompts with; encode with this node's CLIP output to record",
                ),
                _recording_memory_input(),
                _recorded_layers_input(),
            ],
            outputs=[io.Clip.Output(), Recording.Output("recording")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip, max_memory_mib, layers) -> io.NodeOutput:
        return io.NodeOutput(*record_text_encoder(clip, max_memory_mib, cls.hidden.unique_id, layers == "all"))


class SaveFP8Calibration(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FP8ScaledSaveCalibration",
            display_name="Save FP8 Calibration",
            category=CATEGORY,
            search_aliases=CALIBRATION_ALIASES,
            description="Writes what 'Record FP8 Calibration' (or its text-encoder twin) recorded into "
            "models/fp8_calibration and frees it "
            "(unless keep_recording); connect 'path' to a convert node's calibration_path.",
            inputs=[
                Recording.Input(
                    "recording",
                    tooltip="the 'recording' output of 'Record FP8 Calibration' or 'Record FP8 Text Encoder "
                    "Calibration'",
                ),
                io.AnyType.Input(
                    "after",
                    tooltip="the sampler's LATENT or the CONDITIONING (or anything made from them): the file is "
                    "written after they are computed",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="calibration",
                    tooltip=f"name of the saved file in models/{host.CALIBRATION_FOLDER} ('/' makes subfolders, "
                    "_00001_ is added)",
                ),
                io.Boolean.Input(
                    "keep_recording",
                    default=False,
                    tooltip="off: free the recording once saved (the next run records anew); on: go on "
                    "accumulating, so queued runs over many prompts each save everything recorded so far",
                ),
            ],
            outputs=[io.String.Output("path"), io.String.Output("report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, recording, after, filename_prefix, keep_recording) -> io.NodeOutput:
        report = save_recording(recording, filename_prefix, keep_recording)
        text = report.text()
        return io.NodeOutput(report.path, text, ui=ui.PreviewText(text))


class FP8ScaledExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            ConvertModelToFP8,
            ConvertCheckpointFileToFP8,
            LoadFP8Scaled,
            InspectFP8Scaled,
            RecordFP8Calibration,
            RecordFP8TextEncoderCalibration,
            SaveFP8Calibration,
        ]


async def comfy_entrypoint() -> FP8ScaledExtension:
    return FP8ScaledExtension()
