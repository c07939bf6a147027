"""``xbt export``: an adapter as a standalone checkpoint that serving code loads without xbt.

LoRA is merged into the base weights. A bias-free linear ψ (the ``orthogonal`` kind, or a
``linear`` ψ whose bias is zero) then folds into each tower's final projection P: the
backbone output is normalised before ψ, and normalising is blind to scale, so

    normalise(W · normalise(P·h + b)) = normalise((W P)·h + W b)

with W the first ``old_dim`` rows of ψ's matrix. The result is a plain checkpoint of the
backbone's own library whose embedding dimension is the old one (``native`` format):

- ``hf``: a transformers ``CLIPModel`` folder (``config.json`` with ``projection_dim`` =
  old dim, ``model.safetensors``, tokenizer and image processor files);
- ``open_clip``: a folder that ``open_clip`` loads as ``local-dir:FOLDER``
  (``open_clip_config.json`` with ``embed_dim`` = old dim, ``open_clip_model.safetensors``).

A ψ with a bias, or the ``mlp`` kind, sits after the normalisation and does not fold; the
``onnx`` format then writes both towers with ψ as ONNX graphs (``text.onnx``, ``image.onnx``)
that output normalised old-space vectors, with the tokenizer and preprocessing files next
to them. Every export records ``xbt_export.json``: the adapter, the space its vectors live
in, dims, format, and how to load it.

The export is built in a staging folder beside ``--output_dir`` and moved into place only
when complete, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:  # heavy imports stay out of module import (``xbt export --help`` is fast)
    import torch

    from .model import XBTModel
    from .projection import Projection

logger = logging.getLogger(__name__)

FORMATS = ("auto", "native", "onnx")
MANIFEST_FILE = "xbt_export.json"
TEXT_ONNX, IMAGE_ONNX = "text.onnx", "image.onnx"
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
FOLDABLE_HINT = ("train a foldable ψ with `xbt pretrain-text --kind orthogonal` (bias-free; `kind: orthogonal` in "
                 "the stage1 section of an `xbt fit` config), or export it with --format onnx "
                 "(pip install 'xbt-clip[onnx]')")


@dataclass
class ExportConfig:
    """Options of ``xbt export``."""

    adapter: str = field(metadata={"help": "adapter folder (or Hub repo id) written by `xbt train`; may also be "
                                           "given as the first argument"})
    output_dir: str = field(metadata={"help": "folder to write the standalone checkpoint into (must be new or "
                                              "empty unless --overwrite)"})
    format: str = field(default="auto", metadata={
        "help": f"one of {FORMATS}: native = the backbone library's own checkpoint with ψ folded in (needs a "
                f"bias-free ψ); onnx = both towers with ψ as ONNX graphs; auto = native when ψ folds, else onnx"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the adapter (branch, tag or "
                                                                 "commit)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output_dir"})
    opset: int = field(default=17, metadata={"help": "ONNX opset version (onnx format only)"})
    verify: bool = field(default=True, metadata={
        "help": "load the written checkpoint back with its own library and check it reproduces the adapter's "
                "vectors on a probe batch before moving it into place"})

    def __post_init__(self):
        if self.format not in FORMATS:
            raise InputError(f"--format must be one of {FORMATS}, got {self.format!r}.")
        if not self.adapter:
            raise InputError("--adapter is required: the adapter folder or Hub repo id to export.")
        if not self.output_dir:
            raise InputError("--output_dir is required: the folder to write the export into.")
        if self.opset < 14:
            raise InputError(f"--opset must be an ONNX opset version of 14 or higher, got {self.opset}.")


# ---------------------------------------------------------------------------------
# ψ folding
# ---------------------------------------------------------------------------------
def unfoldable_reason(projection: Projection) -> str | None:
    """Why ψ cannot be folded into the towers' projections, or ``None`` when it can."""
    if projection.kind == "mlp":
        return "ψ is of kind 'mlp' (a residual MLP after the normalisation does not fold into a linear layer)"
    bias = getattr(projection.linear, "bias", None)
    if bias is not None and bool(bias.detach().abs().max() > 0):
        return (f"ψ is of kind {projection.kind!r} with a non-zero bias (normalisation sits between the "
                f"backbone's projection and ψ, so a bias does not fold)")
    return None


def psi_matrix(projection: Projection) -> torch.Tensor:
    """W: the rows of ψ's (bias-free) linear map that give the old space, ``(old_dim, new_dim)``, float64."""
    import torch

    with torch.no_grad():
        return projection.linear.weight.detach()[: projection.old_dim].to("cpu", torch.float64)


def fold_linear(layer: torch.nn.Linear, matrix: torch.Tensor) -> torch.nn.Linear:
    """A new ``nn.Linear`` computing ``matrix · layer(x)`` (weight W·P, bias W·b)."""
    import torch

    weight = layer.weight
    folded = torch.nn.Linear(layer.in_features, matrix.shape[0], bias=layer.bias is not None,
                             device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(matrix.to(weight.device) @ weight.double())
        if layer.bias is not None:
            folded.bias.copy_(matrix.to(weight.device) @ layer.bias.double())
    return folded


def fold_right(parameter: torch.Tensor, matrix: torch.Tensor) -> torch.nn.Parameter:
    """A new parameter P' = P · Wᵀ for a projection applied as ``x @ P`` (open_clip)."""
    import torch

    with torch.no_grad():
        folded = parameter.detach().double() @ matrix.to(parameter.device).T
    return torch.nn.Parameter(folded.to(parameter.dtype), requires_grad=False)


def backbone_unfoldable_reason(backbone) -> str | None:
    """Why ψ cannot be folded into this backbone's projection layers, or ``None`` when it can."""
    model, family = backbone.model, backbone.family
    if family == "clip":
        from transformers import CLIPModel

        if type(model) is not CLIPModel:
            return (f"the backbone is a transformers {type(model).__name__}; xbt folds ψ only into a CLIPModel's "
                    f"text_projection and visual_projection")
        return None
    if family == "open_clip":
        from open_clip.model import CLIP
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if type(model) is not CLIP or not isinstance(visual, VisionTransformer) or visual.proj is None \
                or model.text_projection is None:
            return (f"the backbone is an open_clip {type(model).__name__} with a {type(visual).__name__} image "
                    f"tower; xbt folds ψ only into a CLIP with a ViT image tower and projections on both towers")
        return None
    if family == "siglip":
        return ("the backbone is a SigLIP model: its image embedding ends in the pooling head's residual MLP, and "
                "its config has no projection_dim, so no layer of a plain SiglipModel can hold ψ")
    return f"xbt does not know how to fold ψ into a backbone of the {family!r} family"


def tokenizer_call(backbone, token_names: list[str]) -> dict[str, Any]:
    """How serving code must tokenise for this export (recorded in ``xbt_export.json``)."""
    if backbone.backend == "open_clip":
        return {"library": "open_clip", "load": "open_clip.get_tokenizer('local-dir:DIR')", "inputs": token_names}
    # a family that pads every text to max_length (SigLIP) pads even a one-word text to it
    padding = "max_length" if backbone.tokenize(["a"])["input_ids"].shape[1] == backbone.max_length else "longest"
    return {"library": "transformers", "load": "transformers.AutoTokenizer.from_pretrained(DIR)",
            "call": {"padding": padding, "truncation": True, "max_length": backbone.max_length},
            "inputs": token_names}


def _fold_hf(model: XBTModel, matrix: torch.Tensor, folder: Path) -> dict[str, Any]:
    clip = model.backbone.model
    old_dim = matrix.shape[0]
    clip.text_projection = fold_linear(clip.text_projection, matrix)
    clip.visual_projection = fold_linear(clip.visual_projection, matrix)
    clip.projection_dim = old_dim
    # the tower configs carry projection_dim too (CLIPTextModelWithProjection reads it)
    for config in (clip.config, clip.config.text_config, clip.config.vision_config):
        if hasattr(config, "projection_dim"):
            config.projection_dim = old_dim
    clip.save_pretrained(str(folder), safe_serialization=True)
    _save_hf_preprocessing(model, folder)
    return {"library": "transformers",
            "usage": "model = transformers.CLIPModel.from_pretrained(DIR); tokens = "
                     "transformers.AutoTokenizer.from_pretrained(DIR)(texts, **tokenizer['call']); pixel_values = "
                     "transformers.AutoImageProcessor.from_pretrained(DIR)(images=images)['pixel_values']; vectors = "
                     "L2-normalised model.get_text_features(**tokens).pooler_output / get_image_features("
                     "pixel_values).pooler_output (a plain tensor in transformers < 5)"}


def _save_hf_preprocessing(model: XBTModel, folder: Path) -> None:
    model.backbone.tokenizer.save_pretrained(str(folder))
    model.backbone.preprocess.processor.save_pretrained(str(folder))


def _open_clip_config(model: XBTModel, old_dim: int) -> dict[str, Any]:
    """``open_clip_config.json`` for the exported model: the backbone's own, with the old embed_dim."""
    import copy

    from open_clip.transformer import QuickGELU

    clip = model.backbone.model
    model_cfg = copy.deepcopy(model.backbone.model_config)
    model_cfg["embed_dim"] = old_dim
    # a built-in pretrained tag can switch QuickGELU on at load time without it being in the model config
    if any(isinstance(module, QuickGELU) for module in clip.modules()):
        model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg, "preprocess_cfg": copy.deepcopy(clip.visual.preprocess_cfg)}


def _save_open_clip_preprocessing(model: XBTModel, folder: Path, old_dim: int) -> None:
    """``open_clip_config.json``, plus the tokenizer files when the model uses a transformers tokenizer.

    ``open_clip.get_tokenizer('local-dir:DIR')`` loads such a tokenizer from DIR itself.
    """
    config = _open_clip_config(model, old_dim)
    _write_json(folder / OPEN_CLIP_CONFIG, config)
    if config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        model.backbone.tokenizer.tokenizer.save_pretrained(str(folder))


def _fold_open_clip(model: XBTModel, matrix: torch.Tensor, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file
    from torch import nn

    clip = model.backbone.model
    if isinstance(clip.text_projection, nn.Linear):
        clip.text_projection = fold_linear(clip.text_projection, matrix)
    else:
        clip.text_projection = fold_right(clip.text_projection, matrix)
    clip.visual.proj = fold_right(clip.visual.proj, matrix)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in clip.state_dict().items()}
    save_file(state, str(folder / OPEN_CLIP_WEIGHTS))
    _save_open_clip_preprocessing(model, folder, matrix.shape[0])
    return {"library": "open_clip",
            "usage": "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:DIR'); tokenizer = "
                     "open_clip.get_tokenizer('local-dir:DIR'); vectors = model.encode_text(tokens, "
                     "normalize=True) / model.encode_image(pixels, normalize=True)"}


_FOLDERS = {"clip": _fold_hf, "open_clip": _fold_open_clip}  # by backbone family


# ---------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------
def _onnx_towers(model: XBTModel):
    """(text module, image module, token names): tokens/pixels -> normalised old-space vectors."""
    import copy

    from torch import nn
    from torch.nn import functional as F
    from torch.nn.utils import parametrize

    token_names = list(model.backbone.tokenize(["a photo"]).keys())
    projection = copy.deepcopy(model.projection)
    if parametrize.is_parametrized(projection.linear):
        # the orthogonal ψ's weight as a constant: the graph need not recompute the parametrisation
        parametrize.remove_parametrizations(projection.linear, "weight", leave_parametrized=True)

    class TextTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.projection = model.backbone, projection  # registered: traced as weights

        def forward(self, input_ids, attention_mask=None):
            tokens = {"input_ids": input_ids, "attention_mask": attention_mask}
            features = self.backbone.text_features({name: tokens[name] for name in token_names})
            return self.projection(F.normalize(features.float(), dim=-1))

    class ImageTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.projection = model.backbone, projection

        def forward(self, pixel_values):
            return self.projection(F.normalize(self.backbone.image_features(pixel_values).float(), dim=-1))

    return TextTower().eval(), ImageTower().eval(), token_names


def _export_onnx(model: XBTModel, folder: Path, opset: int) -> dict[str, Any]:
    import torch

    try:
        import onnx  # noqa: F401  (torch.onnx needs it; imported here for a clear message)
    except ImportError as error:
        raise InputError("--format onnx needs the onnx package: pip install 'xbt-clip[onnx]'.") from error
    backbone = model.backbone
    if backbone.backend == "hf" and hasattr(backbone.model, "set_attn_implementation"):
        # the eager attention traces to plain ONNX ops; its outputs equal sdpa's
        backbone.model.set_attn_implementation("eager")
    text, image, token_names = _onnx_towers(model)
    tokens = backbone.tokenize(["a photo of a cat", "two dogs playing on the grass in the sun"])
    size = backbone.image_size
    weights = next(backbone.model.parameters())
    pixels = torch.zeros(2, 3, size, size, dtype=weights.dtype, device=weights.device)
    token_args = tuple(tokens[name].to(backbone.device) for name in token_names)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path (open_clip) is one fused op ONNX has no equivalent of
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _export_graphs(text, image, token_names, token_args, pixels, folder, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if backbone.backend == "hf":
        _save_hf_preprocessing(model, folder)
        preprocessing = ("transformers.AutoTokenizer.from_pretrained(DIR)(texts, **tokenizer['call']) and "
                         "AutoImageProcessor.from_pretrained(DIR)")
    else:
        # open_clip reads its tokenizer and preprocessing from this config (no weights: the graphs hold them)
        _save_open_clip_preprocessing(model, folder, model.dim)
        preprocessing = ("open_clip.get_tokenizer('local-dir:DIR') and open_clip.transform.image_transform_v2("
                         "open_clip.transform.PreprocessCfg(**preprocess_cfg), is_train=False) with preprocess_cfg "
                         f"from DIR/{OPEN_CLIP_CONFIG}")
    return {"library": "onnxruntime",
            "onnx": {"opset": opset,
                     "text": {"file": TEXT_ONNX, "inputs": token_names, "output": "embedding"},
                     "image": {"file": IMAGE_ONNX, "inputs": ["pixel_values"], "output": "embedding",
                               "image_size": size}},
            "usage": f"onnxruntime.InferenceSession(DIR/{TEXT_ONNX}).run(['embedding'], {{name: int64 array}}) and "
                     f"InferenceSession(DIR/{IMAGE_ONNX}).run(['embedding'], {{'pixel_values': float32 array}}) give "
                     f"normalised vectors; inputs from {preprocessing}"}


def _export_graphs(text, image, token_names, token_args, pixels, folder: Path, opset: int) -> None:
    import warnings

    import torch

    # The TorchScript exporter: torch's dynamo exporter (torch 2.14) cannot yet write these
    # graphs at opset <= 17 with dynamic batch and sequence axes. Its tracer warns about
    # shape checks it freezes; they are static for a given model, and the test runs other
    # batch sizes and sequence lengths than the ones traced.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        # the towers' only advanced indexing picks the end-of-text token by argmax: never a negative index
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(text, token_args, str(folder / TEXT_ONNX), input_names=token_names,
                          output_names=["embedding"], opset_version=opset, dynamo=False,
                          dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in token_names},
                                        "embedding": {0: "batch"}})
        torch.onnx.export(image, (pixels,), str(folder / IMAGE_ONNX), input_names=["pixel_values"],
                          output_names=["embedding"], opset_version=opset, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "embedding": {0: "batch"}})


# ---------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------
def _onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


def choose_format(requested: str, projection: Projection, onnx_available: bool,
                  backbone_reason: str | None = None) -> str:
    """``native`` or ``onnx`` for this ψ and backbone, or an InputError saying why the requested one cannot hold it.

    ``backbone_reason`` is :func:`backbone_unfoldable_reason` of the backbone (``None``: it folds).
    """
    psi_reason = unfoldable_reason(projection)
    if requested == "native" and psi_reason:
        raise InputError(f"--format native cannot hold this adapter: {psi_reason}. To export it, {FOLDABLE_HINT}.")
    if requested == "native" and backbone_reason:
        raise InputError(f"--format native cannot hold this adapter: {backbone_reason}. Export it with "
                         f"--format onnx (pip install 'xbt-clip[onnx]').")
    if requested == "auto":
        if not psi_reason and not backbone_reason:
            return "native"
        if not onnx_available:
            fix = f"Either {FOLDABLE_HINT}" if psi_reason else "Install it: pip install 'xbt-clip[onnx]'"
            raise InputError(f"This adapter cannot be folded into a plain checkpoint ({psi_reason or backbone_reason}) "
                             f"and the onnx package is not installed for --format onnx. {fix}.")
        return "onnx"
    return requested


def export_adapter(model: XBTModel, output_dir: str | Path, format: str = "auto", overwrite: bool = False,
                   opset: int = 17, source: str | None = None, verify: bool = True) -> Path:
    """Write ``model`` (an unmerged XBTModel) as a standalone checkpoint; returns the folder.

    The model is merged in place (its LoRA weights fold into the backbone), and for the
    native format its projection layers are replaced, so it should not be used afterwards.
    With ``verify`` the written checkpoint is loaded back with its own library and must
    reproduce the merged model's vectors on a probe batch (see :class:`_Probe`).
    """
    if format not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {format!r}.")
    output = Path(output_dir).expanduser().resolve()
    _check_output(output, overwrite)
    chosen = choose_format(format, model.projection, _onnx_available(), backbone_unfoldable_reason(model.backbone))
    backend = model.backbone.backend
    manifest = {
        "format": chosen,
        "backend": backend,
        "family": model.backbone.family,
        "adapter": {"model_id": model.model_id, "reference": source},
        "space_id": model.space_id,
        "source_space_id": model.source_space_id,
        "dim": model.dim,
        "new_dim": model.projection.new_dim,
        "projection": {"kind": model.projection.kind, "extra_dims": model.projection.extra_dims,
                       "folded": chosen == "native"},
        "normalize": True,
        "tokenizer": tokenizer_call(model.backbone, list(model.backbone.tokenize(["a"]).keys())),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        model.eval()
        model.merge()
        probe = _Probe(model)
        if chosen == "native":
            manifest.update(_FOLDERS[model.backbone.family](model, psi_matrix(model.projection), staging))
        else:
            manifest.update(_export_onnx(model, staging, opset))
        if verify:
            manifest["verified_max_abs_diff"] = probe.check(staging, chosen, backend, manifest["tokenizer"])
        manifest["xbt_version"] = _xbt_version()
        _write_json(staging / MANIFEST_FILE, manifest)
        if output.exists():
            shutil.rmtree(output) if overwrite else output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Exported %s (%s, %s) to %s", source or "the adapter", backend, chosen, output)
    return output


class _Probe:
    """The merged model's old-space vectors for fixed raw inputs, to check an export against.

    The check starts from the same raw texts and image and goes through the export's own
    tokenizer and preprocessing files, loaded by their libraries, as serving code would.
    A wrong fold, graph or preprocessing file is off by far more than float rounding, so
    the tolerance is loose enough for float16 backbones and onnxruntime's kernels.
    """

    TOLERANCE = 1e-3
    TEXTS = ["a photo of a dog", "two red squares and a small blue circle on the green grass"]

    def __init__(self, model: XBTModel):
        import numpy as np
        from PIL import Image

        self.image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
        self.expected = (model.encode_text(self.TEXTS), model.encode_image([self.image]))

    def check(self, folder: Path, format: str, backend: str, tokenizer: dict[str, Any]) -> float:
        """Max abs difference of the export's vectors from the expected ones; XBTError beyond the tolerance."""
        import torch
        from torch.nn import functional as F

        from .errors import XBTError

        tokens, pixels = self._inputs(folder, backend, tokenizer)
        with torch.no_grad():
            if format == "onnx":
                got = self._onnx(folder, tokens, pixels)
            elif backend == "hf":
                from transformers import CLIPModel

                clip = CLIPModel.from_pretrained(str(folder)).eval()
                got = [clip.get_text_features(**tokens), clip.get_image_features(pixel_values=pixels.to(clip.dtype))]
                got = [output if isinstance(output, torch.Tensor) else output.pooler_output for output in got]
            else:
                import open_clip

                clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
                got = [clip.eval().encode_text(tokens["input_ids"]), clip.encode_image(pixels)]
        got = [F.normalize(torch.as_tensor(vectors).float(), dim=-1) for vectors in got]
        if [tuple(v.shape) for v in got] != [tuple(v.shape) for v in self.expected]:
            raise XBTError(f"The exported {format} checkpoint gives vectors of shapes {[tuple(v.shape) for v in got]}, "
                           f"expected {[tuple(v.shape) for v in self.expected]}; nothing was written.")
        difference = max(float((a - b).abs().max()) for a, b in zip(got, self.expected))
        if difference > self.TOLERANCE:
            raise XBTError(f"The exported {format} checkpoint does not reproduce the adapter's vectors "
                           f"(max abs difference {difference:.2e} > {self.TOLERANCE}; its tokenizer, preprocessing "
                           f"or weights differ); nothing was written. Try --format onnx, or report it with the "
                           f"adapter's xbt_config.json.")
        return difference

    def _inputs(self, folder: Path, backend: str, tokenizer: dict[str, Any]):
        """Token tensors and pixels from the export's own tokenizer and preprocessing files, called as recorded."""
        import torch

        if backend == "hf":
            from transformers import AutoImageProcessor, AutoTokenizer

            tokens = AutoTokenizer.from_pretrained(str(folder))(self.TEXTS, **tokenizer["call"], return_tensors="pt")
            pixels = AutoImageProcessor.from_pretrained(str(folder))(images=[self.image], return_tensors="pt")
            return {name: tokens[name] for name in tokenizer["inputs"]}, pixels["pixel_values"]
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        preprocess = image_transform_v2(PreprocessCfg(**config["preprocess_cfg"]), is_train=False)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        return {"input_ids": tokenizer(self.TEXTS)}, torch.stack([preprocess(self.image)])

    @staticmethod
    def _onnx(folder: Path, tokens: dict, pixels) -> list:
        try:
            import onnxruntime
        except ImportError as error:
            raise InputError("Verifying an ONNX export needs onnxruntime: pip install 'xbt-clip[onnx]', or pass "
                             "--verify false.") from error

        def run(name: str, feeds: dict) -> Any:
            session = onnxruntime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
            return session.run(["embedding"], feeds)[0]

        return [run(TEXT_ONNX, {k: v.numpy().astype("int64") for k, v in tokens.items()}),
                run(IMAGE_ONNX, {"pixel_values": pixels.float().numpy()})]


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise InputError(f"--output_dir {str(output)!r} is a file; give a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InputError(f"--output_dir {str(output)!r} exists and is not empty; choose a new folder or pass "
                         f"--overwrite to replace it.")


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _xbt_version() -> str:
    from . import __version__

    return __version__


def _with_adapter_flag(argv: Sequence[str]) -> list[str]:
    """``xbt export ADAPTER ...``: a leading bare argument is the adapter."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return ["--adapter", argv[0], *argv[1:]]
    return argv


def run(argv: Sequence[str]) -> int:
    """``xbt export ADAPTER --output_dir DIR``: write an adapter as a checkpoint serving code loads without xbt."""
    from .config import parse_configs

    (config,) = parse_configs([ExportConfig], _with_adapter_flag(argv), prog="xbt export", description=run.__doc__)
    from .model import XBTModel

    output = Path(config.output_dir).expanduser().resolve()
    _check_output(output, config.overwrite)  # before the (slow) model load
    adapter = Path(config.adapter).expanduser().resolve()
    if adapter.is_dir() and (output == adapter or output in adapter.parents):
        raise InputError(f"--output_dir {str(output)!r} holds the adapter {config.adapter!r} being exported; "
                         f"choose another folder.")
    model = XBTModel.from_pretrained(config.adapter, revision=config.revision)
    written = export_adapter(model, output, format=config.format, overwrite=config.overwrite, opset=config.opset,
                             source=config.adapter, verify=config.verify)
    manifest = json.loads((written / MANIFEST_FILE).read_text())
    print(json.dumps({"output_dir": str(written), **{k: manifest[k] for k in ("format", "backend", "dim", "space_id")}},
                     indent=2))
    return 0


__all__ = ["ExportConfig", "choose_format", "export_adapter", "fold_linear", "fold_right", "psi_matrix", "run",
           "unfoldable_reason"]
