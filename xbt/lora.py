"""Every contact xbt has with peft: LoRA injected in place, saved, loaded, switched off and merged.

peft's public functional API (``peft.functional``, meant for integrations that do not
wrap the model in a ``PeftModel``) covers injection and the adapter state dict; this
module uses it for those. It has no call to switch adapters off or to
merge them, so for those two this module calls the tuner layers' own methods
(``BaseTunerLayer.enable_adapters`` / ``merge``, which transformers' and diffusers' peft
integrations call too), and nothing outside this module touches a peft layer.

LoRA goes into the backbone's own module, so module names (and the backbone
fingerprint) stay the base model's. The files are peft's: ``adapter_config.json`` and
``adapter_model.safetensors`` with ``PeftModel``'s key prefix, so ``PeftModel`` reads
them too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_config import AdapterConfig
from .errors import InputError, ModelLoadError

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # the key prefix PeftModel.save_pretrained writes; kept so PeftModel reads ours


def peft_version() -> str:
    import peft

    return peft.__version__


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` already carries LoRA weights."""
    return any("lora_" in name for name, _ in model.named_parameters())


def inject(model: nn.Module, adapter: AdapterConfig, target_modules: str | Sequence[str], base_name: str) -> None:
    """Put fresh LoRA layers (B = 0: the model computes what it did) on ``target_modules``.

    peft freezes everything else: afterwards only the LoRA weights train.

    ``target_modules`` is a peft full-match regex (a backbone preset) or a list of module
    names (``AdapterConfig.target_modules``); ``base_name`` is recorded in ``adapter_config.json``.
    """
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    config = LoraConfig(r=adapter.lora_rank, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                        target_modules=target_modules, base_model_name_or_path=base_name)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as error:  # peft: no module of the model matches target_modules
        raise InputError(f"target_modules {target_modules!r} matches no layer peft can adapt in {base_name} "
                         f"({error})") from error


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA weights of ``model`` (the only backbone parameters that ever train)."""
    return [parameter for name, parameter in model.named_parameters() if "lora_" in name]


def lora_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The LoRA tensors of ``model`` by name (what identifies an adapter's weights)."""
    return [(name, tensor) for name, tensor in model.state_dict().items() if "lora_" in name]


def save(model: nn.Module, directory: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's names and key layout)."""
    from peft.functional import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    save_file({_PEFT_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()},
              str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))


def load(model: nn.Module, directory: Path) -> None:
    """Load ``adapter_model.safetensors`` into the LoRA layers :func:`inject` made; every tensor must fit."""
    from peft.functional import set_peft_model_state_dict

    path = directory / ADAPTER_WEIGHTS_FILE
    weights = {name.removeprefix(_PEFT_PREFIX): tensor for name, tensor in load_file(str(path)).items()}
    expected = len(lora_state(model))
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys or len(weights) != expected:
        raise ModelLoadError(f"{path} does not match the LoRA layout recorded with it ({len(weights)} tensors for "
                             f"{expected} LoRA weights, unexpected: {list(result.unexpected_keys)[:3]}). "
                             f"The adapter directory is inconsistent.")


def _outer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """peft's tuner layers in ``model`` that are not nested inside another one (an MHA's out_proj is)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    outer: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(f"{o}.") for o, _ in outer):
            outer.append((name, module))
    return outer


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within this block ``model`` computes its base (native) outputs; gradient flags are restored after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    parameters = lora_parameters(model)
    trainable = [parameter.requires_grad for parameter in parameters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in zip(parameters, trainable):  # enable_adapters(True) marks every adapter trainable
            parameter.requires_grad_(flag)


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weights and put the plain base module back (irreversible).

    MultiheadAttention layers (open_clip) go through peft's own MHA routine, which adds the
    out_proj update as many times as peft's MHA forward pass does (:func:`mha_out_proj_factor`),
    so the merged model computes what the adapted one did.
    """
    with torch.no_grad():
        for name, layer in _outer_layers(model):
            if hasattr(layer, "unload_and_optionally_merge_module"):
                plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
            else:
                layer.merge(safe_merge=True)
                plain = layer.get_base_layer()
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config


def has_mha_lora(model: nn.Module) -> bool:
    """Whether any LoRA layer of ``model`` adapts an ``nn.MultiheadAttention``."""
    return any(isinstance(layer.get_base_layer(), nn.MultiheadAttention) for _, layer in _outer_layers(model))


@functools.cache
def mha_out_proj_factor() -> int:
    """How many times the installed peft applies a MultiheadAttention LoRA's out_proj update (1 or 2).

    peft 0.21 applies it twice (an open peft report); an adapter trained under one behaviour
    computes something else under the other, so the factor is recorded with every adapter
    that has such layers and checked when it is loaded (:func:`check_mha_behaviour`).
    """
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    generator = torch.Generator().manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(4, 1, batch_first=True)
    plain = nn.MultiheadAttention(4, 1, batch_first=True)
    plain.load_state_dict(holder.attn.state_dict())
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["attn"]), holder)
    layer = holder.attn
    with torch.no_grad():
        for parameter in lora_parameters(holder):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        x = torch.randn(1, 3, 4, generator=generator)
        adapted = layer(x, x, x, need_weights=False)[0]
        plain.in_proj_weight += layer.get_delta_weight(ADAPTER_NAME)
        out_delta = layer.get_base_layer().out_proj.get_delta_weight(ADAPTER_NAME)
        errors = {}
        for factor in (1, 2):
            reference = nn.MultiheadAttention(4, 1, batch_first=True)
            reference.load_state_dict(plain.state_dict())
            reference.out_proj.weight += factor * out_delta
            errors[factor] = float((reference(x, x, x, need_weights=False)[0] - adapted).abs().max())
    return min(errors, key=errors.get)


def check_mha_behaviour(recorded: int | None, where: str | Path) -> None:
    """Refuse an adapter trained under another peft MultiheadAttention behaviour than the installed one."""
    if recorded is not None and recorded != mha_out_proj_factor():
        raise ModelLoadError(
            f"The adapter in {where} was trained with a peft whose MultiheadAttention LoRA applies the out_proj "
            f"update {recorded}x; the installed peft {peft_version()} applies it {mha_out_proj_factor()}x, so "
            f"its embeddings would differ. Install the peft version recorded in xbt_config.json."
        )
