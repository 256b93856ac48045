"""The node classes (ComfyUI schema API, pinned to ``comfy_api.v0_0_2``): widgets in, engine call, outputs.

Each ``execute`` only translates widgets into a call of ``conversion``, ``loading`` or the engine's
``inspection``; the behaviour lives there, where it is tested without ComfyUI.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..quant_core.formats import FORMATS
from ..quant_core.fp8 import FP8_DTYPES
from ..quant_core.inspection import inspect_file
from ..quant_core.policy import AUTO, PRESETS
from . import conversion, host
from .loading import load_fp8_model
from .options import FP8_COMPUTE, ROUNDING_METHODS, convert_options
from .recording import record_model, record_text_encoder, save_recording

CATEGORY = "quantization/fp8"
ALIASES = ["fp8", "quantize", "scaled fp8", "compress model", "fp8 scaled", "convert"]
CALIBRATION_ALIASES = ["calibration", "record activations", "gptq", *ALIASES]
Recording = io.Custom("FP8_CALIBRATION_RECORDING")
RECORDED_LAYERS = ("quantized", "all")


def _calibration_inputs() -> list:
    """Statistics recorded by 'Record FP8 Calibration': GPTQ rounding for the weights they cover."""
    return [
        io.Combo.Input(
            "calibration",
            options=host.calibration_files(),
            default=host.NO_CALIBRATION,
            optional=True,
            tooltip="a file from models/fp8_calibration written by 'Save FP8 Calibration': GPTQ rounding "
            "for the layers it covers (needs rounding 'auto' or 'learned')",
        ),
        io.String.Input(
            "calibration_path",
            optional=True,
            force_input=True,
            tooltip="the 'path' output of 'Save FP8 Calibration' (saved in the same run); overrides calibration",
        ),
    ]


def _option_inputs() -> list:
    """The engine's options as widgets; optimiser details are marked advanced."""
    return [
        io.Combo.Input(
            "format",
            options=list(FORMATS),
            default="comfy",
            tooltip="comfy: ComfyUI >= 0.4 layout; legacy: scaled_fp8, every ComfyUI since 2024; "
            "ultra8: uint8 scale codec, load it with 'Load FP8 Scaled (8-bit scales)'",
        ),
        io.Combo.Input(
            "rounding",
            options=list(ROUNDING_METHODS),
            default="auto",
            tooltip="; ".join(f"{name}: {what}" for name, what in ROUNDING_METHODS.items()),
        ),
        io.Combo.Input(
            "preset",
            options=[AUTO, *PRESETS],
            default=AUTO,
            tooltip="model family whose sensitive layers stay in full precision (auto: detect)",
        ),
        io.Boolean.Input(
            "shared_scales",
            default=True,
            tooltip="weights of one module (e.g. q/k/v/out of an attention) share one scale",
        ),
        io.Combo.Input("fp8_format", options=sorted(FP8_DTYPES), default="float8_e4m3fn", advanced=True),
        io.Int.Input(
            "num_iter",
            default=200,
            min=0,
            max=10000,
            advanced=True,
            tooltip="maximum optimiser iterations per tensor (rounding: learned)",
        ),
        io.Int.Input(
            "calib_samples", default=96, min=1, max=8192, advanced=True, tooltip="calibration input rows per tensor"
        ),
        io.Float.Input("lr", default=3e-2, min=1e-5, max=10.0, step=1e-3, round=1e-5, advanced=True),
        io.Float.Input("reg_lambda", default=0.015, min=0.0, max=10.0, step=1e-3, round=1e-5, advanced=True),
        io.Int.Input(
            "min_tensor_size",
            default=1024,
            min=0,
            max=2**31 - 1,
            advanced=True,
            tooltip="quantize only weights with at least this many elements",
        ),
        io.Boolean.Input(
            "text_encoders",
            default=False,
            advanced=True,
            tooltip="full checkpoints: also convert the T5 / LLM text encoders inside (CLIP stays whole); "
            "off: the diffusion model only",
        ),
        io.Boolean.Input(
            "keep_distillation",
            default=False,
            advanced=True,
            tooltip="keep distilled_guidance_layer, final_layer, img_in, txt_in in full precision",
        ),
        io.String.Input(
            "exclude",
            default="",
            multiline=True,
            advanced=True,
            tooltip="regexes, one per line: tensors matching any stay in full precision",
        ),
        io.String.Input(
            "include",
            default="",
            multiline=True,
            advanced=True,
            tooltip="regexes, one per line: eligible weights matching any are always quantized",
        ),
        io.Int.Input(
            "seed",
            default=0,
            control_after_generate=False,  # a conversion is reproducible, not re-rolled per run
            min=0,
            max=2**31 - 1,
            advanced=True,
            tooltip="the same seed and settings give the same file",
        ),
    ]


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
            io.String.Input("filename_prefix", default="fp8_scaled/ComfyUI"),
            *_option_inputs(),
            *_calibration_inputs(),  # after the options: saved UI workflows list widget values by position
            io.Combo.Input(
                "fp8_compute",
                options=list(FP8_COMPUTE),
                default="weight-only",
                optional=True,  # prompts saved before it existed keep the safe default
                tooltip="on GPUs with fp8 compute: " + "; ".join(f"{k}: {v}" for k, v in FP8_COMPUTE.items()),
            ),
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
            io.Model.Input("model"),
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
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"))],
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
                io.Combo.Input("source", options=host.source_files()),
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
                io.Model.Input("model"),
                io.Int.Input(
                    "max_memory_mib",
                    default=4096,
                    min=16,
                    max=2**20,
                    tooltip="memory the recording may hold (CPU); layers first seen after the cap are not recorded",
                ),
                io.Combo.Input(
                    "layers",
                    options=list(RECORDED_LAYERS),
                    default="quantized",
                    tooltip="quantized: the layers the converter quantizes at its default settings (the model's "
                    "preset keeps e.g. embedders and final layers); all: every Linear layer, for conversions with "
                    "include regexes or another preset",
                ),
            ],
            outputs=[io.Model.Output(), Recording.Output("recording")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, max_memory_mib, layers) -> io.NodeOutput:
        return io.NodeOutput(*record_model(model, max_memory_mib, cls.hidden.unique_id, layers == "all"))


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
                io.Clip.Input("clip"),
                io.Int.Input(
                    "max_memory_mib",
                    default=4096,
                    min=16,
                    max=2**20,
                    tooltip="memory the recording may hold (CPU); layers first seen after the cap are not recorded",
                ),
                io.Combo.Input(
                    "layers",
                    options=list(RECORDED_LAYERS),
                    default="quantized",
                    tooltip="quantized: the layers the converter quantizes at its default settings; all: every "
                    "Linear layer, for conversions with include regexes or another preset",
                ),
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
                Recording.Input("recording"),
                io.AnyType.Input(
                    "after",
                    tooltip="the sampler's LATENT or the CONDITIONING (or anything made from them): the file is "
                    "written after they are computed",
                ),
                io.String.Input("filename_prefix", default="calibration"),
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
