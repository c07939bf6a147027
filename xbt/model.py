"""XBTModel: the frozen new CLIP + LoRA adapters + ψ, emitting vectors in the OLD space.

An ``XBTModel`` is an :class:`~xbt.spaces.Encoder`: its ``space_id`` is the space it
writes into (the target: the old encoder's space at training time, which for a chained
upgrade is the first model's), its ``model_id`` its own weights' identity. One object
serves every use, chosen by ``space=`` (:data:`SPACES`):

- ``"target"`` (default): new model through its adapters, then ψ -> normalised
  old-space vectors, searchable against the old gallery;
- ``"source"``: the new model's native embeddings (adapters switched off);
- ``"full"``: with a BT²/OCA ψ (``extra_dims`` > 0), the whole ``old_dim + extra_dims``
  vector, in the adapter's own space :attr:`XBTModel.full_space_id`;
- ``blend_old=α`` on queries (text or image): mixed on the sphere with the old encoder's
  embedding of the same query (after Ricci et al.), the old encoder loaded lazily on
  first use; ``blend_old="fitted"`` takes the weight fitted per direction on held-out
  support pairs after stage 2 (:mod:`xbt.blending`, recorded as ``query_blending``).
  Blending runs the old encoder on every query.

All LoRA handling is in :mod:`xbt.lora`. Saving and loading go through huggingface_hub's
``ModelHubMixin`` (``save_pretrained`` / ``from_pretrained``, a local folder or a Hub repo
id at any revision, through the Hub cache). The adapter directory (a local folder is laid
out exactly like a Hub repo)::

    xbt_config.json             models (references, fingerprints, dims), space ids, LoRA config, training summary
    projection/                 ψ exactly as stage 1 saves it (config.json + model.safetensors)
    uncertainty/                FastFill's backfill-ordering head, when stage 2 trained one (xbt.uncertainty)
    adapter_config.json         peft LoRA config        } at the root: peft's offline loader
    adapter_model.safetensors   peft LoRA weights       } mishandles subfolders
    README.md                   model card

Only safetensors are read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from torch import nn
from torch.nn import functional as F

from . import lora
from .adapter_config import AdapterConfig
from .backbones import DualEncoder, load_backbone
from .errors import FingerprintMismatchError, InputError, ModelLoadError
from .images import ImageLike
from .io import atomic_write_json
from .projection import Projection
from .spaces import Encoder, check_same_space, full_space_id
from .uncertainty import UNCERTAINTY_DIR, UncertaintyHead, load_head

logger = logging.getLogger(__name__)

CONFIG_FILE = "xbt_config.json"
PROJECTION_DIR = "projection"
TARGET, SOURCE, FULL = "target", "source", "full"
SPACES = (TARGET, SOURCE, FULL)
"""``space=`` values of :meth:`XBTModel.encode_text` / :meth:`XBTModel.encode_image` (default ``TARGET``)."""
BLEND_METHODS = ("linear", "slerp")
FITTED = "fitted"  # blend_old= value: the weight recorded in query_blending for the query's direction
QUERY_DIRECTIONS = {"text": "text→image", "image": "image→text"}  # the direction a query modality serves
FORMAT_VERSION = 2


def blend_embeddings(adapted: torch.Tensor, old: torch.Tensor, alpha: float, method: str = "slerp") -> torch.Tensor:
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


@dataclass
class BatchEmbeddings:
    """A training batch embedded by :meth:`XBTModel.embed_batch` (``None``: not given / no extra dims)."""

    image: torch.Tensor | None  # target space, (N, old_dim)
    text: torch.Tensor | None
    full_image: torch.Tensor | None  # full space, (N, old_dim + extra_dims)
    full_text: torch.Tensor | None


class XBTModel(nn.Module, ModelHubMixin, library_name="xbt",
               tags=["xbt", "clip", "backward-compatible", "lora", "retrieval"]):
    """A new CLIP whose embeddings land in an old encoder's space.

    Args:
        backbone: the new model, frozen; LoRA is injected into it in place.
        projection: ψ from the new space into the old (usually the stage-1 result); its
            ``target_space`` is the space this model writes into.
        adapter: LoRA placement and size.
        old_reference: reference of the old model (recorded; used to load its text
            encoder for query blending).
        old_model_id: ``model_id`` of the old encoder ψ was trained against (recorded; for a
            native backbone its fingerprint, for an adapter its weights' id).
        training: free-form JSON summary of how the adapter was trained (saved with it).
        query_blending: the blend weights fitted on support pairs (:func:`xbt.blending.fit_query_blending`).
    """

    def __init__(
        self,
        backbone: DualEncoder,
        projection: Projection,
        adapter: AdapterConfig | None = None,
        old_reference: str | None = None,
        old_model_id: str | None = None,
        training: dict[str, Any] | None = None,
        query_blending: dict[str, Any] | None = None,
    ):
        super().__init__()
        self._hub_mixin_config = None  # the configuration is xbt_config.json (written by _save_pretrained)
        if lora.has_lora(backbone.model):
            raise InputError(f"The backbone {backbone.reference} already carries LoRA layers (it is in use by "
                             f"another XBTModel); load a fresh one with xbt.load_backbone.")
        if projection.new_dim != backbone.embed_dim:
            raise InputError(f"ψ expects new-space vectors of dimension {projection.new_dim}, but the backbone "
                             f"{backbone.reference} produces {backbone.embed_dim}. Use the ψ trained for this model.")
        projection.check_spaces(source=backbone.space_id)
        self.backbone = backbone
        self.projection = projection
        self.adapter = adapter or AdapterConfig()
        self.old_reference = old_reference
        self.old_model_id = old_model_id
        self.training_summary = dict(training or {})
        self.query_blending = query_blending  # {"method", "blend_old": {direction: α}, "curve", "support"} or None
        self.merged = False
        self._unmerged_id: str | None = None  # the identity before merge(): the full space stays this adapter's
        self._old_encoder: Encoder | None = None
        self._uncertainty_head: UncertaintyHead | None = None
        lora.inject(backbone.model, self.adapter, self.target_modules, str(backbone.reference))
        logger.info("LoRA r=%d on %s: %d trainable backbone parameters", self.adapter.lora_rank,
                    self.adapter.target_modules or "+".join(self.adapter.lora_towers) + "/"
                    + "+".join(self.adapter.lora_layers), sum(p.numel() for p in self.lora_parameters()))

    @property
    def target_modules(self) -> str | list[str]:
        """What peft adapts: ``adapter.target_modules`` when given, else the backbone's presets."""
        return self.backbone.lora_target_modules(self.adapter.lora_towers, self.adapter.lora_layers,
                                                 target_modules=self.adapter.target_modules)

    # -- the Encoder protocol (xbt.spaces) ----------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Identity of this model's current weights: the backbone fingerprint, the LoRA and ψ tensors."""
        digest = hashlib.sha256(self.backbone.fingerprint.encode())
        named = [(f"lora.{k}", v) for k, v in lora.lora_state(self.backbone.model)]
        for name, tensor in sorted(named + [(f"psi.{k}", v) for k, v in self.projection.state_dict().items()]):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"xbt-{digest.hexdigest()[:16]}" + ("-merged" if self.merged else "")

    @property
    def model_id(self) -> str:
        """What this adapter is: the identity of its current weights (see :attr:`fingerprint`)."""
        return self.fingerprint

    @property
    def dim(self) -> int:
        """Dimension of the vectors it writes (the target space's)."""
        return self.projection.old_dim

    @property
    def space_id(self) -> str | None:
        """The space its vectors live in: the target (old) space, not its own."""
        return self.projection.target_space

    @property
    def source_space_id(self) -> str:
        """The new backbone's native space (``space="source"``)."""
        return self.backbone.space_id

    @property
    def full_space_id(self) -> str | None:
        """The space of the full vectors (``space="full"``), its own; ``None`` when ψ has no extra dims."""
        if not self.projection.extra_dims:
            return None
        return full_space_id(self._unmerged_id if self.merged else self.model_id)

    # -- LoRA -----------------------------------------------------------------------
    def lora_parameters(self) -> list[nn.Parameter]:
        """The adapter weights (the only backbone parameters that ever train)."""
        return lora.lora_parameters(self.backbone.model)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Within this block the backbone computes its native (source-space) features."""
        if self.merged:
            raise InputError("This XBTModel was merged: its adapters are folded into the backbone, so the native "
                             "new-model embeddings are gone. Load it again without merge() for space='source'.")
        with lora.disabled(self.backbone.model):
            yield

    def merge(self) -> XBTModel:
        """Fold the LoRA weights into the backbone for zero-overhead inference (irreversible).

        The merged model runs exactly the base architecture and computes what the adapted
        one did (see :func:`xbt.lora.merge`).
        """
        if not self.merged:
            self._unmerged_id = self.model_id
            lora.merge(self.backbone.model)
            self.merged = True
        return self

    # -- encoding -------------------------------------------------------------------
    def forward(
        self, pixels: torch.Tensor | None = None, tokens: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Differentiable target-space embeddings ``(image, text)`` of a training batch."""
        batch = self.embed_batch(pixels, tokens)
        return batch.image, batch.text

    def embed_batch(self, pixels: torch.Tensor | None = None,
                    tokens: dict[str, torch.Tensor] | None = None) -> BatchEmbeddings:
        """Differentiable target-space and (with extra dims) full-space embeddings of a training batch, from one
        pass through each tower."""
        image = text = full_image = full_text = None
        if pixels is not None:
            image, full_image = self.projection.split(F.normalize(self.backbone.image_features(pixels), dim=-1))
        if tokens is not None:
            text, full_text = self.projection.split(F.normalize(self.backbone.text_features(tokens), dim=-1))
        return BatchEmbeddings(image, text, full_image, full_text)

    def full_encoder(self) -> FullSpaceEncoder:
        """This adapter's full space as an :class:`~xbt.spaces.Encoder` of its own (``space_id``
        :attr:`full_space_id`, ``dim`` = old dims + extra dims): for evaluation, or as an old side."""
        self._check_space(FULL)
        return FullSpaceEncoder(self)

    def encode_text(
        self,
        texts: Sequence[str],
        space: str = TARGET,
        blend_old: float | str = 0.0,
        blend_method: str = "slerp",
        batch_size: int = 256,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Normalised float32 text embeddings on the CPU.

        Args:
            space: one of :data:`SPACES`: ``"target"`` (the old space, through the adapters
                and ψ), ``"source"`` (native new model) or ``"full"`` (ψ with extra dims only).
            blend_old: α in [0, 1] (or ``"fitted"``: the recorded text→image weight); > 0 mixes each
                query with the old encoder's embedding of the same text (``"target"`` space only; runs
                the old encoder on every query, loaded on first use).
            blend_method: ``"slerp"`` (the great circle, default) or ``"linear"`` (renormalised weighted sum).
        """
        return self._encode("text", texts, space, blend_old, blend_method, batch_size, progress)

    def encode_image(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        space: str = TARGET,
        blend_old: float | str = 0.0,
        blend_method: str = "slerp",
        batch_size: int = 128,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Normalised float32 image embeddings on the CPU in ``space`` (one of :data:`SPACES`); ``blend_old``
        as in :meth:`encode_text`, with the old image encoder (``"fitted"``: the image→text weight)."""
        return self._encode("image", images, space, blend_old, blend_method, batch_size, progress)

    def _encode(self, modality: str, items, space: str, blend_old: float | str, blend_method: str,
                batch_size: int, progress: bool | None) -> torch.Tensor:
        self._check_space(space)
        if isinstance(blend_old, str) and blend_old != FITTED:
            raise InputError(f"blend_old must be a number in [0, 1] or {FITTED!r}, got {blend_old!r}.")
        alpha = self.fitted_blend(modality) if blend_old == FITTED else float(blend_old)
        if alpha and space != TARGET:
            raise InputError(f"blend_old mixes into the old (target) space; it cannot be used with space={space!r}.")
        if space == SOURCE:
            with self.adapters_disabled():
                return getattr(self.backbone, f"encode_{modality}")(items, batch_size=batch_size, progress=progress)
        embeddings = self._project(getattr(self.backbone, f"encode_{modality}")(items, batch_size=batch_size,
                                                                                 progress=progress), space)
        if alpha:
            old = getattr(self.old_encoder(), f"encode_{modality}")(items, batch_size=batch_size, progress=progress)
            embeddings = blend_embeddings(embeddings, old, alpha, blend_method)
        return embeddings

    def fitted_blend(self, modality: str) -> float:
        """The blend weight fitted for queries of ``modality`` (``"text"``: text→image, ``"image"``: image→text)."""
        if not self.query_blending:
            raise InputError("blend_old='fitted': this adapter records no fitted blend weights; train stage 2 with "
                             "--blend_support PAIRS (held-out pairs), or pass a number in [0, 1].")
        return float(self.query_blending["blend_old"][QUERY_DIRECTIONS[modality]])

    def _project(self, new_embeddings: torch.Tensor, space: str = TARGET) -> torch.Tensor:
        device = next(self.projection.parameters()).device
        with torch.inference_mode():
            new_embeddings = new_embeddings.to(device)
            if space == FULL:
                return F.normalize(self.projection.extended(new_embeddings), dim=-1).float().cpu()
            return self.projection(new_embeddings).float().cpu()

    def _check_space(self, space: str) -> None:
        if space not in SPACES:
            raise InputError(f"space must be one of {SPACES} (the old space through the adapters, the native new "
                             f"model, or the full vectors of a ψ with extra dims), got {space!r}. For the old model "
                             f"itself use its own encoder.")
        if space == FULL and not self.projection.extra_dims:
            raise InputError(f"space='full' needs a ψ with extra dims (kind 'orthogonal', extra_dims > 0); this "
                             f"one is {self.projection.kind!r} with extra_dims=0, so its full vectors are the "
                             f"space='target' ones.")

    # -- the old encoder (query blending only) ------------------------------------------
    def old_encoder(self) -> Encoder:
        """The old encoder, loaded on first use from the recorded reference and space-checked."""
        if self._old_encoder is None:
            if not self.old_reference:
                raise InputError("No old model reference is recorded for this XBTModel; attach the old model "
                                 "with use_old_encoder(load_encoder(OLD_REFERENCE)) to blend queries.")
            from .encoders import load_encoder

            logger.info("Loading the old model %s for query blending", self.old_reference)
            self.use_old_encoder(load_encoder(self.old_reference, device=self.backbone.device))
        return self._old_encoder

    def use_old_encoder(self, encoder: Encoder) -> None:
        """Use ``encoder`` (any :class:`~xbt.spaces.Encoder` of the target space) as the old model for blending."""
        check_same_space(self.space_id, encoder.space_id, f"The old encoder {encoder.model_id}",
                         "This adapter writes into another space; blend with an encoder of its target space.")
        if encoder.dim != self.dim:
            raise InputError(f"The old encoder {encoder.model_id} has dimension {encoder.dim}, ψ outputs {self.dim}.")
        object.__setattr__(self, "_old_encoder", encoder)  # a helper, not a submodule: never saved or trained

    @property
    def uncertainty_head(self) -> UncertaintyHead | None:
        """FastFill's head trained in stage 2 (:mod:`xbt.uncertainty`): orders backfilling; None if not trained."""
        return self._uncertainty_head

    def attach_uncertainty_head(self, head: UncertaintyHead | None) -> None:
        """Keep ``head`` with this adapter (saved as ``uncertainty/``); it reads vectors of the adapter's target
        space and is not part of the encoder (never in its identity, never trained through it)."""
        if head is not None:
            head.check_space(self.space_id, "The adapter's target space")
        object.__setattr__(self, "_uncertainty_head", head)

    # -- saving and loading (huggingface_hub's ModelHubMixin) ------------------------------
    def config_dict(self) -> dict[str, Any]:
        """Everything but the weights and ψ (``xbt_config.json``)."""
        from . import __version__

        model = self.backbone.model
        return {
            "format_version": FORMAT_VERSION,
            "xbt_version": __version__,
            "model_id": self.model_id,
            "source_space": self.source_space_id,
            "target_space": self.space_id,
            "old_model": {"reference": self.old_reference, "fingerprint": self.old_model_id, "embed_dim": self.dim},
            "new_model": {"reference": str(self.backbone.reference), "fingerprint": self.backbone.fingerprint,
                          "embed_dim": self.backbone.embed_dim, "backend": self.backbone.backend},
            "lora": {**asdict(self.adapter), "resolved_target_modules": self.target_modules,
                     "trainable_parameters": sum(p.numel() for p in self.lora_parameters()),
                     "peft_version": lora.peft_version(),
                     "peft_mha_out_proj_factor": lora.mha_out_proj_factor() if lora.has_mha_lora(model) else None},
            "training": self.training_summary,
            "query_blending": self.query_blending,
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write the adapter directory (see the module docstring) into ``save_directory``."""
        if self.merged:
            raise InputError("A merged XBTModel cannot be saved as an adapter: save it before calling merge().")
        from .model_card import write_model_card

        lora.save(self.backbone.model, save_directory)
        self.projection.save_pretrained(save_directory / PROJECTION_DIR)
        if self.uncertainty_head is not None:
            self.uncertainty_head.save_pretrained(save_directory / UNCERTAINTY_DIR)
        atomic_write_json(save_directory / CONFIG_FILE, self.config_dict())
        write_model_card(save_directory)  # before the mixin would write its generic card
        logger.info("Saved XBT adapter to %s", save_directory)

    def push_to_hub(self, repo_id: str, eval_dir: str | Path | None = None, **options) -> str:
        """Save this adapter (with ``eval_dir`` and a model card) and commit it to ``repo_id``; returns the commit.

        ``options`` go to :func:`xbt.hub.push_adapter` (``token``, ``private``, ``branch``, ``commit_message``).
        """
        import tempfile

        from .hub import push_adapter

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_adapter(folder, repo_id, eval_dir=eval_dir, **options)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        backbone: DualEncoder | None = None,
        device: str | torch.device | None = "cpu",
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> XBTModel:
        """Rebuild a saved XBTModel from a local folder or a Hub repo id (at ``revision``).

        The new backbone is loaded from the recorded reference unless ``backbone`` is
        given; either way its fingerprint must equal the recorded one.
        """
        # The mixin's own from_pretrained first fetches a root config.json, which an adapter
        # has no use for (its configuration is xbt_config.json) and which fails offline; the
        # loading itself is the mixin's _from_pretrained hook.
        if isinstance(pretrained_model_name_or_path, Path) and not pretrained_model_name_or_path.is_dir():
            raise ModelLoadError(f"Adapter folder {str(pretrained_model_name_or_path)!r} does not exist.")
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, backbone=backbone, device=device)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        backbone: DualEncoder | None = None,
        device: str | torch.device | None = "cpu",
    ) -> XBTModel:
        folder = _resolve_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                 local_files_only=local_files_only, token=token)
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
                f"The adapter in {model_id} was trained on the new model {new['reference']} "
                f"(fingerprint {new['fingerprint']}), but the backbone given is {backbone.reference} "
                f"(fingerprint {backbone.fingerprint}). Pass the model it was trained on."
            )
        projection = Projection.from_pretrained(folder / PROJECTION_DIR)
        projection.check_spaces(source=config["source_space"], target=config["target_space"])
        recorded = config["lora"]
        lora.check_mha_behaviour(recorded.get("peft_mha_out_proj_factor"), folder)
        adapter = AdapterConfig(**{f.name: recorded[f.name] for f in fields(AdapterConfig)})
        old = config["old_model"]
        model = cls(backbone, projection, adapter, old_reference=old["reference"], old_model_id=old["fingerprint"],
                    training=config.get("training"), query_blending=config.get("query_blending"))
        lora.load(backbone.model, folder)
        if (folder / UNCERTAINTY_DIR).is_dir():
            model.attach_uncertainty_head(load_head(folder))
        if model.model_id != config["model_id"]:
            raise ModelLoadError(f"The weights in {folder} have identity {model.model_id}, but {CONFIG_FILE} records "
                                 f"{config['model_id']}: the adapter directory is inconsistent.")
        return model.to(backbone.device).eval()


class FullSpaceEncoder:
    """An adapter's full vectors (``space="full"``) as an encoder of the adapter's own full space.

    Not a copy of the model: it encodes through it, so it follows the adapter's current weights.
    """

    def __init__(self, model: XBTModel):
        self.model = model

    @property
    def dim(self) -> int:
        return self.model.projection.full_dim

    @property
    def space_id(self) -> str:
        return self.model.full_space_id

    @property
    def model_id(self) -> str:
        return self.model.model_id

    @property
    def source_space_id(self) -> str:
        """The new backbone's space (recorded by ``xbt embed`` as for the adapter itself)."""
        return self.model.source_space_id

    @property
    def preprocess(self):
        """The new backbone's image preprocessing (what the full vectors are computed from)."""
        return self.model.backbone.preprocess

    def encode_text(self, texts: Sequence[str], **options: Any) -> torch.Tensor:
        return self.model.encode_text(texts, space=FULL, **options)

    def encode_image(self, images: Sequence[ImageLike] | torch.Tensor, **options: Any) -> torch.Tensor:
        return self.model.encode_image(images, space=FULL, **options)


def read_adapter_config(location: str | Path, revision: str | None = None) -> dict[str, Any]:
    """The checked ``xbt_config.json`` of an adapter folder or Hub repo, without loading any weights."""
    return _read_config(_resolve_folder(str(location), revision=revision))


def _resolve_folder(model_id: str, **download) -> Path:
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if model_id.startswith(("/", ".", "~")):
        raise ModelLoadError(f"Adapter folder {str(path)!r} does not exist.")
    from .hub import download_adapter

    return download_adapter(model_id, **download)


def _read_config(folder: Path) -> dict[str, Any]:
    required = (CONFIG_FILE, f"{PROJECTION_DIR}/config.json", f"{PROJECTION_DIR}/model.safetensors",
                lora.ADAPTER_CONFIG_FILE, lora.ADAPTER_WEIGHTS_FILE)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{folder} is not an xbt adapter directory: missing {', '.join(missing)}.")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["new_model"]["fingerprint"], config["old_model"]["reference"], config["model_id"]
        config["source_space"], config["target_space"]
        [config["lora"][f.name] for f in fields(AdapterConfig)]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{folder / CONFIG_FILE} is malformed ({type(error).__name__}: {error}).") from error
    if config.get("format_version", 0) != FORMAT_VERSION:
        raise ModelLoadError(f"{folder} holds adapter format {config.get('format_version')}; this xbt reads format "
                             f"{FORMAT_VERSION}. Save it again with the xbt that wrote it, or retrain.")
    return config
