"""Configuration of an adapter: where LoRA goes (:class:`AdapterConfig`) and the shape of ψ (:class:`ProjectionConfig`).

Torch-free on purpose: commands build their ``--help`` from these dataclasses without
importing torch or peft. Every check raises :class:`~xbt.errors.InputError` naming the
option, the value given and what is allowed, so a bad value ends in one CLI error line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError

TOWERS = ("vision", "text")
LAYER_KINDS = ("attention", "mlp")
PROJECTION_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear": ("affine", ()),
    "mlp": ("affine + residual MLP", ("hidden_dim",)),
    "orthogonal": ("isometry; with extra_dims the BT²/OCA shape", ("extra_dims",)),
}
"""ψ kind -> (what it is, the shape options it takes). Torch-free, for ``--help`` and validation; each kind's
module is built by the row of the same name in :data:`xbt.projection.KIND_BUILDERS`."""


def _check_choices(option: str, values: list[str], allowed: tuple[str, ...]) -> None:
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise InputError(f"{option} must be one or more of {list(allowed)}, got {list(values)}")


@dataclass
class AdapterConfig:
    """Where LoRA goes in the new model and how big it is.

    Placement is by the backbone's presets (``lora_towers`` x ``lora_layers``) unless
    ``target_modules`` names the modules explicitly.
    """

    lora_towers: list[str] = field(default_factory=lambda: list(TOWERS), metadata={
        "help": f"towers that get LoRA adapters, from {list(TOWERS)}"})
    lora_layers: list[str] = field(default_factory=lambda: list(LAYER_KINDS), metadata={
        "help": f"layer kinds in those towers that get LoRA adapters, from {list(LAYER_KINDS)}"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (at least 1)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: updates are scaled by "
                                                               "lora_alpha / lora_rank (> 0)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    # list[str] for the command line; a single string (from a config file or code) is a peft regex.
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "explicit peft target_modules (module names, suffix match), overriding the presets given by "
                "lora_towers and lora_layers; in a config file a single string is a full-match regex"})

    def __post_init__(self):
        _check_choices("lora_towers", self.lora_towers, TOWERS)
        _check_choices("lora_layers", self.lora_layers, LAYER_KINDS)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise InputError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise InputError(f"lora_alpha must be greater than 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
            raise InputError(f"target_modules must be one or more module names (or one regex), "
                             f"got {self.target_modules!r}")


@dataclass
class ProjectionConfig:
    """Shape of ψ, the map from the new model's space into the old one."""

    kind: str = field(default="mlp", metadata={
        "help": "ψ kind: " + ", ".join(f"{name} ({text})" for name, (text, _) in PROJECTION_KINDS.items())})
    hidden_dim: int | None = field(default=None, metadata={
        "help": "hidden width of the mlp kind (default: twice the larger of the two dims)"})
    extra_dims: int = field(default=0, metadata={
        "help": "orthogonal kind only: dimensions beyond the old ones that keep new information (BT²/OCA)"})

    def __post_init__(self):
        if self.kind not in PROJECTION_KINDS:
            raise InputError(f"kind must be one of {list(PROJECTION_KINDS)}, got {self.kind!r}")
        takes = PROJECTION_KINDS[self.kind][1]
        owners = {option: " or ".join(repr(k) for k, (_, options) in PROJECTION_KINDS.items() if option in options)
                  for option in ("hidden_dim", "extra_dims")}
        if self.hidden_dim is not None and ("hidden_dim" not in takes or self.hidden_dim < 1):
            raise InputError(f"hidden_dim applies to kind {owners['hidden_dim']} only and must be at least 1, got "
                             f"hidden_dim={self.hidden_dim} with kind {self.kind!r}")
        if self.extra_dims < 0 or (self.extra_dims and "extra_dims" not in takes):
            raise InputError(f"extra_dims applies to kind {owners['extra_dims']} only and must be >= 0, got "
                             f"extra_dims={self.extra_dims} with kind {self.kind!r}")
