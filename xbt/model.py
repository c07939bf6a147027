"""XBTModel: the frozen new CLIP + LoRA adapters + ψ, emitting vectors in the OLD space.

One object serves three uses:

- ``encode_text`` / ``encode_image`` (default ``space="xbt"``): new model through its
  adapters, then ψ -> normalised old-space vectors, searchable against the old gallery;
- ``space="new"``: the new model's native embeddings (adapters switched off);
- ``blend_old=α`` on text queries: mixed with the old text encoder's embedding of the
  same text (after Ricci et al.), the old text encoder loaded lazily on first use.

LoRA is injected in place into the backbone's own module (peft ``inject_adapter_in_model``),
so module names, and therefore the backbone fingerprint, stay those of the base model.

On disk (a local folder is laid out exactly like a Hub repo)::

    xbt_config.json             models (references, fingerprints, dims), ψ and LoRA configs, training summary
    projection.safetensors      ψ weights
    adapter_config.json         peft LoRA config        } at the root: peft's offline loader
    adapter_model.safetensors   peft LoRA weights       } mishandles subfolders

Only safetensors are read or written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .backbones import LAYER_KINDS, TOWERS, DualEncoder, load_backbone
from .errors import FingerprintMismatchError, InputError, ModelLoadError
from .images import ImageLike
from .projection import Projection

logger = logging.getLogger(__name__)

CONFIG_FILE = "xbt_config.json"
PROJECTION_FILE = "projection.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # key prefix PeftModel.save_pretrained uses; kept for interoperability
SPACES = ("xbt", "new")
BLEND_METHODS = ("linear", "slerp")
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Where LoRA goes and how big it is (placement through the backbone's presets)."""

    lora_towers: list[str] = field(default_factory=lambda: list(TOWERS))
    lora_layers: list[str] = field(default_factory=lambda: list(LAYER_KINDS))
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    def __post_init__(self):
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")


def blend_embeddings(adapted: torch.Tensor, old: torch.Tensor, alpha: float, method: str = "linear") -> torch.Tensor:
    """Mix two sets of normalised vectors: ``alpha`` = 0 gives ``adapted``, 1 gives ``old``.

    ``linear`` renormalises the weighted sum; ``slerp`` walks the great circle between them.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"blend_old must be between 0 and 1, got {alpha}.")
    if method == "linear":
        return F.normalize((1.0 - alpha) * adapted + alpha * old, dim=-1)
    if method == "slerp":
        cosine = (adapted * old).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        angle = torch.acos(cosine)
        sine = torch.sin(angle)
        nearly_parallel = sine < 1e-6  # slerp degenerates to lerp there
        safe_sine = torch.where(nearly_parallel, torch.ones_like(sine), sine)
        mixed = (torch.sin((1.0 - alpha) * angle) * adapted + torch.sin(alpha * angle) * old) / safe_sine
        mixed = torch.where(nearly_parallel, (1.0 - alpha) * adapted + alpha * old, mixed)
        return F.normalize(mixed, dim=-1)
    raise InputError(f"Unknown blend method {method!r}; choose from {BLEND_METHODS}.")


def _tuner_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft LoRA layers in ``module`` that are not nested inside another LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    outer: list[tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if isinstance(child, BaseTunerLayer) and not any(name.startswith(f"{o}.") for o, _ in outer):
            outer.append((name, child))
    return outer


class XBTModel(nn.Module):
    """A new CLIP whose embeddings land in an old CLIP's space.

    Args:
        backbone: the new model, frozen; LoRA is injected into it in place.
        projection: ψ from the new space into the old (usually the stage-1 result).
        adapter: LoRA placement and size.
        old_reference: reference of the old model (recorded; used to load its text
            encoder for query blending).
        old_fingerprint: fingerprint of the old model; defaults to the one ψ records.
        training: free-form JSON summary of how the adapter was trained (saved with it).
    """

    def __init__(
        self,
        backbone: DualEncoder,
        projection: Projection,
        adapter: AdapterConfig | None = None,
        old_reference: str | None = None,
        old_fingerprint: str | None = None,
        training: dict[str, Any] | None = None,
    ):
        super().__init__()
        if any("lora_" in name for name, _ in backbone.model.named_parameters()):
            raise InputError(f"The backbone {backbone.reference} already carries LoRA layers (it is in use by "
                             f"another XBTModel); load a fresh one with xbt.load_backbone.")
        if projection.new_dim != backbone.embed_dim:
            raise InputError(f"ψ expects new-space vectors of dimension {projection.new_dim}, but the backbone "
                             f"{backbone.reference} produces {backbone.embed_dim}. Use the ψ trained for this model.")
        projection.check_spaces(source=backbone.space_id, target=old_fingerprint)
        self.backbone = backbone
        self.projection = projection
        self.adapter = adapter or AdapterConfig()
        self.old_reference = old_reference
        self.old_fingerprint = old_fingerprint or projection.target_space
        self.training_summary = dict(training or {})
        self.merged = False
        self._old_encoder: DualEncoder | None = None
        self._inject_lora()

    # -- LoRA -----------------------------------------------------------------------
    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.adapter.lora_rank,
            lora_alpha=self.adapter.lora_alpha,
            lora_dropout=self.adapter.lora_dropout,
            target_modules=self.backbone.lora_target_modules(self.adapter.lora_towers, self.adapter.lora_layers),
            base_model_name_or_path=str(self.backbone.reference),
        )

    def _inject_lora(self) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self._lora_config(), self.backbone.model)
        for name, parameter in self.backbone.model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        logger.info("LoRA r=%d on %s/%s: %d trainable backbone parameters", self.adapter.lora_rank,
                    "+".join(self.adapter.lora_towers), "+".join(self.adapter.lora_layers),
                    sum(p.numel() for p in self.lora_parameters()))

    @property
    def fingerprint(self) -> str:
        """Identity of this model's current weights: the backbone fingerprint, the LoRA and ψ tensors."""
        digest = hashlib.sha256(self.backbone.fingerprint.encode())
        named = [(f"lora.{k}", v) for k, v in self.backbone.model.state_dict().items() if "lora_" in k]
        for name, tensor in sorted(named + [(f"psi.{k}", v) for k, v in self.projection.state_dict().items()]):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"xbt-{digest.hexdigest()[:16]}" + ("-merged" if self.merged else "")

    # -- the Encoder protocol (xbt.spaces) ----------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension of the vectors it writes (the target space's)."""
        return self.projection.old_dim

    @property
    def model_id(self) -> str:
        """What this adapter is: the identity of its current weights (see :attr:`fingerprint`)."""
        return self.fingerprint

    @property
    def space_id(self) -> str | None:
        """The space its vectors live in: the target (old) space, not its own."""
        return self.projection.target_space or self.old_fingerprint

    @property
    def source_space_id(self) -> str:
        """The new backbone's native space (``space="new"``)."""
        return self.backbone.space_id

    def lora_parameters(self) -> list[nn.Parameter]:
        """The adapter weights (the only backbone parameters that ever train)."""
        return [p for name, p in self.backbone.model.named_parameters() if "lora_" in name]

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within this block the backbone computes its native (new-space) features."""
        if self.merged:
            raise InputError("This XBTModel was merged: its adapters are folded into the backbone, so the native "
                             "new-model embeddings are gone. Load it again without merge() for space='new'.")
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [module for module in self.backbone.model.modules() if isinstance(module, BaseTunerLayer)]
        trainable = [p.requires_grad for p in self.lora_parameters()]
        for module in layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module in layers:
                module.enable_adapters(True)
            for parameter, flag in zip(self.lora_parameters(), trainable):
                parameter.requires_grad_(flag)

    def merge(self) -> XBTModel:
        """Fold the LoRA weights into the backbone for zero-overhead inference (irreversible).

        Each LoRA layer is merged and replaced by its base module, so the merged model runs
        exactly the base architecture. MultiheadAttention layers (open_clip) are unloaded
        through peft's own MHA routine: peft 0.21 adds the out_proj update twice both in its
        MHA forward pass and in that merge, so the merge reproduces the adapted forward
        pass exactly (tested; see :func:`mha_out_proj_factor`).
        """
        if self.merged:
            return self
        model = self.backbone.model
        with torch.no_grad():
            for name, layer in _tuner_layers(model):
                if hasattr(layer, "unload_and_optionally_merge_module"):
                    plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
                else:
                    layer.merge(safe_merge=True)
                    plain = layer.get_base_layer()
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child_name, plain)
        if hasattr(model, "peft_config"):
            del model.peft_config
        self.merged = True
        return self

    def _has_mha_lora(self) -> bool:
        return any(isinstance(module.get_base_layer(), nn.MultiheadAttention)
                   for _, module in _tuner_layers(self.backbone.model))

    # -- encoding -------------------------------------------------------------------
    def forward(
        self, pixels: torch.Tensor | None = None, tokens: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Differentiable old-space embeddings ``(image, text)`` of a training batch."""
        image = text = None
        if pixels is not None:
            image = self.projection(F.normalize(self.backbone.image_features(pixels), dim=-1))
        if tokens is not None:
            text = self.projection(F.normalize(self.backbone.text_features(tokens), dim=-1))
        return image, text

    def encode_text(
        self,
        texts: Sequence[str],
        space: str = "xbt",
        blend_old: float = 0.0,
        blend_method: str = "linear",
        batch_size: int = 256,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Normalised float32 text embeddings on the CPU.

        Args:
            space: ``"xbt"`` (old space, through the adapters and ψ) or ``"new"`` (native new model).
            blend_old: α in [0, 1]; > 0 mixes each query with the old text encoder's embedding
                of the same text (``"xbt"`` space only; loads the old text encoder on first use).
            blend_method: ``"linear"`` (renormalised weighted sum) or ``"slerp"``.
        """
        self._check_space(space)
        if space == "new":
            if blend_old:
                raise InputError("blend_old mixes into the OLD space; it cannot be used with space='new'.")
            with self.adapters_disabled():
                return self.backbone.encode_text(texts, batch_size=batch_size, progress=progress)
        embeddings = self._project(self.backbone.encode_text(texts, batch_size=batch_size, progress=progress))
        if blend_old:
            old = self.old_text_encoder().encode_text(texts, batch_size=batch_size, progress=progress)
            embeddings = blend_embeddings(embeddings, old, blend_old, blend_method)
        return embeddings

    def encode_image(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        space: str = "xbt",
        batch_size: int = 128,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Normalised float32 image embeddings on the CPU, in the old space (``"xbt"``) or the native ``"new"``."""
        self._check_space(space)
        if space == "new":
            with self.adapters_disabled():
                return self.backbone.encode_image(images, batch_size=batch_size, progress=progress)
        return self._project(self.backbone.encode_image(images, batch_size=batch_size, progress=progress))

    def _project(self, new_embeddings: torch.Tensor) -> torch.Tensor:
        device = next(self.projection.parameters()).device
        with torch.inference_mode():
            return self.projection(new_embeddings.to(device)).float().cpu()

    @staticmethod
    def _check_space(space: str) -> None:
        if space not in SPACES:
            raise InputError(f"space must be one of {SPACES} (the old space through the adapters, or the native "
                             f"new model), got {space!r}. For the old model itself use its own encoder.")

    # -- the old text encoder (query blending only) -------------------------------------
    def old_text_encoder(self) -> DualEncoder:
        """The old model, loaded on first use from the recorded reference and fingerprint-checked."""
        if self._old_encoder is None:
            if not self.old_reference:
                raise InputError("No old model reference is recorded for this XBTModel; attach the old model "
                                 "with use_old_encoder(load_backbone(OLD_REFERENCE)) to blend queries.")
            logger.info("Loading the old model %s for query blending", self.old_reference)
            self.use_old_encoder(load_backbone(self.old_reference, device=self.backbone.device))
        return self._old_encoder

    def use_old_encoder(self, encoder: DualEncoder) -> None:
        """Use ``encoder`` as the old model for blending (must be the one ψ was trained for)."""
        if self.old_fingerprint and encoder.fingerprint != self.old_fingerprint:
            raise FingerprintMismatchError(
                f"The old model {encoder.reference} has fingerprint {encoder.fingerprint}, but this adapter was "
                f"trained for the old model {self.old_reference} with fingerprint {self.old_fingerprint}."
            )
        if encoder.embed_dim != self.projection.old_dim:
            raise InputError(f"The old model {encoder.reference} has dimension {encoder.embed_dim}, "
                             f"ψ outputs {self.projection.old_dim}.")
        object.__setattr__(self, "_old_encoder", encoder)  # a helper, not a submodule: never saved or trained

    # -- saving and loading ------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this model except the weights (``xbt_config.json``)."""
        from . import __version__

        projection = self.projection
        return {
            "format_version": FORMAT_VERSION,
            "xbt_version": __version__,
            "old_model": {"reference": self.old_reference, "fingerprint": self.old_fingerprint,
                          "embed_dim": projection.old_dim},
            "new_model": {"reference": str(self.backbone.reference), "fingerprint": self.backbone.fingerprint,
                          "embed_dim": self.backbone.embed_dim, "backend": self.backbone.backend},
            "projection": {"new_dim": projection.new_dim, "old_dim": projection.old_dim, "kind": projection.kind,
                           "hidden_dim": _hidden_dim(projection), "extra_dims": projection.extra_dims},
            "lora": {**asdict(self.adapter),
                     "target_modules": self.backbone.lora_target_modules(self.adapter.lora_towers,
                                                                         self.adapter.lora_layers),
                     "trainable_parameters": sum(p.numel() for p in self.lora_parameters()),
                     "peft_version": _peft_version(),
                     "peft_mha_out_proj_factor": mha_out_proj_factor() if self._has_mha_lora() else None},
            "training": self.training_summary,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter directory (see module docstring); returns its path."""
        if self.merged:
            raise InputError("A merged XBTModel cannot be saved as an adapter: save it before calling merge().")
        from peft import get_peft_model_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter_weights = get_peft_model_state_dict(self.backbone.model, save_embedding_layers=False)
        save_file({_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapter_weights.items()},
                  str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        self.backbone.model.peft_config["default"].save_pretrained(str(directory))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()},
                  str(directory / PROJECTION_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        logger.info("Saved XBT adapter to %s", directory)
        return directory

    def push_to_hub(self, repo_id: str, eval_dir: str | Path | None = None, **options) -> str:
        """Save this adapter (with ``eval_dir`` and a model card) and commit it to ``repo_id``; returns the commit.

        ``options`` go to :func:`xbt.hub.push_adapter` (``token``, ``private``, ``branch``, ``commit_message``).
        """
        import tempfile

        from .hub import push_adapter

        with tempfile.TemporaryDirectory() as folder:
            return push_adapter(self.save_pretrained(folder), repo_id, eval_dir=eval_dir, **options)

    @classmethod
    def from_pretrained(
        cls,
        directory_or_repo_id: str | Path,
        revision: str | None = None,
        backbone: DualEncoder | None = None,
        device: str | torch.device | None = "cpu",
    ) -> XBTModel:
        """Rebuild a saved XBTModel from a local folder or a Hub repo id.

        The new backbone is loaded from the recorded reference unless ``backbone`` is
        given; either way its fingerprint must equal the recorded one.
        """
        folder = _resolve_folder(directory_or_repo_id, revision)
        config = _read_config(folder)
        new = config["new_model"]
        if backbone is None:
            try:
                backbone = load_backbone(new["reference"], device=device)
            except Exception as error:
                raise ModelLoadError(f"Could not load the new model {new['reference']} this adapter was trained "
                                     f"on ({error}). Load it yourself and pass backbone=...") from error
        if backbone.fingerprint != new["fingerprint"]:
            raise FingerprintMismatchError(
                f"The adapter in {directory_or_repo_id} was trained on the new model {new['reference']} "
                f"(fingerprint {new['fingerprint']}), but the backbone given is {backbone.reference} "
                f"(fingerprint {backbone.fingerprint}). Pass the model it was trained on."
            )
        old = config["old_model"]
        projection = Projection(**config["projection"], source_space=new["fingerprint"],
                                target_space=old["fingerprint"])
        _load_weights(projection, load_file(str(folder / PROJECTION_FILE)), folder / PROJECTION_FILE)
        lora = config["lora"]
        _check_mha_behaviour(lora.get("peft_mha_out_proj_factor"), folder)
        adapter = AdapterConfig(**{k: lora[k] for k in AdapterConfig.__dataclass_fields__})
        model = cls(backbone, projection, adapter, old_reference=old["reference"],
                    old_fingerprint=old["fingerprint"], training=config.get("training"))
        model._load_adapter_weights(folder / ADAPTER_WEIGHTS_FILE)
        return model.to(backbone.device).eval()

    def _load_adapter_weights(self, path: Path) -> None:
        from peft import set_peft_model_state_dict

        weights = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
        expected = {k for k, _ in self.backbone.model.state_dict().items() if "lora_" in k}
        result = set_peft_model_state_dict(self.backbone.model, weights)
        if result.unexpected_keys or len(weights) != len(expected):
            raise ModelLoadError(f"{path} does not match the LoRA layout recorded in {CONFIG_FILE} "
                                 f"({len(weights)} tensors for {len(expected)} LoRA weights, unexpected: "
                                 f"{list(result.unexpected_keys)[:3]}). The adapter directory is inconsistent.")


@functools.cache
def mha_out_proj_factor() -> int:
    """How many times the installed peft applies a MultiheadAttention LoRA's out_proj update (1 or 2).

    peft 0.21 applies it twice (an open peft report); an adapter trained under one behaviour
    computes something else under the other, so the factor is recorded with every adapter
    that has such layers and checked when it is loaded.
    """
    from peft import LoraConfig, inject_adapter_in_model

    generator = torch.Generator().manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(4, 1, batch_first=True)
    plain = nn.MultiheadAttention(4, 1, batch_first=True)
    plain.load_state_dict(holder.attn.state_dict())
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["attn"]), holder)
    layer = holder.attn
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        x = torch.randn(1, 3, 4, generator=generator)
        adapted = layer(x, x, x, need_weights=False)[0]
        plain.in_proj_weight += layer.get_delta_weight("default")
        out_delta = layer.get_base_layer().out_proj.get_delta_weight("default")
        errors = {}
        for factor in (1, 2):
            reference = nn.MultiheadAttention(4, 1, batch_first=True)
            reference.load_state_dict(plain.state_dict())
            reference.out_proj.weight += factor * out_delta
            errors[factor] = float((reference(x, x, x, need_weights=False)[0] - adapted).abs().max())
    return min(errors, key=errors.get)


def _peft_version() -> str:
    import peft

    return peft.__version__


def _check_mha_behaviour(recorded: int | None, folder: Path) -> None:
    if recorded is not None and recorded != mha_out_proj_factor():
        raise ModelLoadError(
            f"The adapter in {folder} was trained with a peft whose MultiheadAttention LoRA applies the out_proj "
            f"update {recorded}x; the installed peft {_peft_version()} applies it {mha_out_proj_factor()}x, so "
            f"its embeddings would differ. Install the peft version recorded in xbt_config.json."
        )


def _hidden_dim(projection: Projection) -> int | None:
    return projection.residual[0].out_features if projection.residual is not None else None


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise ModelLoadError(f"{path} does not fit the projection recorded in {CONFIG_FILE}: {error}") from error


def _resolve_folder(directory_or_repo_id: str | Path, revision: str | None) -> Path:
    path = Path(directory_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if isinstance(directory_or_repo_id, Path) or str(directory_or_repo_id).startswith(("/", ".", "~")):
        raise ModelLoadError(f"Adapter folder {str(path)!r} does not exist.")
    from .hub import download_adapter

    return download_adapter(str(directory_or_repo_id), revision=revision)


def _read_config(folder: Path) -> dict[str, Any]:
    missing = [name for name in (CONFIG_FILE, PROJECTION_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
               if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{folder} is not an xbt adapter directory: missing {', '.join(missing)}.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["new_model"]["fingerprint"], config["projection"]["new_dim"], config["lora"]["lora_rank"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{folder / CONFIG_FILE} is malformed ({type(error).__name__}: {error}).") from error
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{folder} was written by a newer xbt (format {config['format_version']}); upgrade xbt.")
    return config
