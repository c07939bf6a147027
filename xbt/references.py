"""Model references: the one string syntax that names a checkpoint of any backend.

    open_clip:ViT-B-32/openai          built-in architecture + pretrained tag
    open_clip:ViT-B-32                 built-in architecture, random weights (warned)
    open_clip:hf-hub:org/repo          open_clip checkpoint hosted on the Hub
    open_clip:local-dir:/path          folder with open_clip_config.json (+ weights)
    hf:openai/clip-vit-base-patch32    transformers CLIP or SigLIP model on the Hub
    hf:/path/to/folder                 transformers model saved with save_pretrained
    xbt:/path/to/adapter               an xbt adapter folder (xbt_config.json); a bare such folder too
    xbt:org/repo[@revision]            an xbt adapter on the Hub

An ``xbt:`` reference names an *encoder* rather than a backbone: an adapter writes
into its target's space, so it can stand wherever an old model is expected (a chained
upgrade v3 -> v2-adapter lands in v1's space); :func:`xbt.encoders.load_encoder`
loads every reference, :func:`xbt.load_backbone` only backbones.

Every other module receives a parsed :class:`ModelRef`, never the raw string.

:data:`BACKENDS` is the one list of reference prefixes. It lives here, not in
:mod:`xbt.backbones`, because parsing must work without importing torch (``--help``,
validating a config before any model loads); each backbone family registers against
one of these prefixes (:func:`xbt.backbones.registry.register` refuses any other),
and several families may share one (``hf:`` holds CLIP and SigLIP, told apart by the
loaded config).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelReferenceError

BACKENDS: dict[str, tuple[str, ...]] = {
    "open_clip": ("open_clip:ARCH/PRETRAINED_TAG", "open_clip:hf-hub:ORG/REPO", "open_clip:local-dir:PATH"),
    "hf": ("hf:ORG/REPO", "hf:PATH"),
}
"""Reference prefix -> the forms it accepts (shown in error messages)."""

ADAPTER_PREFIX = "xbt"
ADAPTER_FORMS = ("xbt:PATH", "xbt:ORG/REPO", "xbt:ORG/REPO@REVISION")
ADAPTER_CONFIG = "xbt_config.json"  # what makes a folder an adapter (xbt.model.CONFIG_FILE)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_SYNTAX_HELP = "Use one of: " + ", ".join(repr(form) for forms in (*BACKENDS.values(), ADAPTER_FORMS)
                                         for form in forms) + "."


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        backend: the prefix, a key of :data:`BACKENDS`, or :data:`ADAPTER_PREFIX`.
        kind: ``"builtin"``, ``"hub"`` or ``"local"``.
        name: architecture name (builtin), repo id (hub) or absolute folder path (local).
        pretrained: open_clip pretrained tag for builtin architectures, else ``None``.
        revision: Hub revision of an adapter repo (``xbt:ORG/REPO@REVISION``), else ``None``.
    """

    backend: str
    kind: str
    name: str
    pretrained: str | None = None
    revision: str | None = None

    @property
    def is_adapter(self) -> bool:
        """An xbt adapter (an encoder into its target's space), not a backbone."""
        return self.backend == ADAPTER_PREFIX

    def __str__(self) -> str:
        if self.is_adapter:
            return f"xbt:{self.name}" + (f"@{self.revision}" if self.revision else "")
        if self.backend == "hf":
            return f"hf:{self.name}"
        if self.kind == "hub":
            return f"open_clip:hf-hub:{self.name}"
        if self.kind == "local":
            return f"open_clip:local-dir:{self.name}"
        return f"open_clip:{self.name}" + (f"/{self.pretrained}" if self.pretrained else "")

    @property
    def path(self) -> Path:
        """The folder of a local reference."""
        if self.kind != "local":
            raise ValueError(f"{self} is not a local reference")
        return Path(self.name)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or "\\" in text


def _local(backend: str, raw: str, text: str) -> ModelRef:
    path = Path(text).expanduser().resolve()
    if not path.exists():
        raise ModelReferenceError(f"Model reference {raw!r}: folder {str(path)!r} does not exist. Check the path.")
    if not path.is_dir():
        raise ModelReferenceError(f"Model reference {raw!r}: {str(path)!r} is a file; a model reference names a folder.")
    return ModelRef(backend=backend, kind="local", name=str(path))


def _adapter(raw: str, rest: str) -> ModelRef:
    if not rest:
        raise ModelReferenceError(f"Model reference {raw!r} names no adapter after 'xbt:'. {_SYNTAX_HELP}")
    if _looks_like_path(rest) or Path(rest).expanduser().is_dir():
        ref = _local(ADAPTER_PREFIX, raw, rest)
        if not (ref.path / ADAPTER_CONFIG).is_file():
            raise ModelReferenceError(f"Model reference {raw!r}: {ref.name!r} holds no {ADAPTER_CONFIG}, so it is "
                                      f"not an xbt adapter folder (XBTModel.save_pretrained writes one).")
        return ref
    repo, at, revision = rest.partition("@")
    if not _HUB_ID.match(repo) or "/" not in repo or (at and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", revision)):
        raise ModelReferenceError(f"Model reference {raw!r}: {rest!r} is neither an existing adapter folder nor a "
                                  f"Hub repo id of the form ORG/REPO[@REVISION].")
    return ModelRef(backend=ADAPTER_PREFIX, kind="hub", name=repo, revision=revision or None)


def parse_reference(reference: str | ModelRef) -> ModelRef:
    """Parse a reference string (see module docstring); raises :class:`ModelReferenceError` with a fix."""
    if isinstance(reference, ModelRef):
        return reference
    if not isinstance(reference, str) or not reference.strip():
        raise ModelReferenceError(f"Empty model reference. {_SYNTAX_HELP}")
    raw = reference.strip()
    if (Path(raw).expanduser() / ADAPTER_CONFIG).is_file():  # a bare adapter folder
        return ModelRef(backend=ADAPTER_PREFIX, kind="local", name=str(Path(raw).expanduser().resolve()))
    backend, sep, rest = raw.partition(":")
    if backend == ADAPTER_PREFIX and sep:
        return _adapter(raw, rest)
    if not sep or backend not in BACKENDS:
        raise ModelReferenceError(
            f"Model reference {raw!r} does not start with a known backend "
            f"({', '.join(b + ':' for b in (*BACKENDS, ADAPTER_PREFIX))}). {_SYNTAX_HELP}"
        )
    if not rest:
        raise ModelReferenceError(f"Model reference {raw!r} names no model after '{backend}:'. {_SYNTAX_HELP}")

    if backend == "hf":
        if _looks_like_path(rest) or Path(rest).expanduser().is_dir():
            return _local("hf", raw, rest)
        if not _HUB_ID.match(rest):
            raise ModelReferenceError(f"Model reference {raw!r}: {rest!r} is neither an existing folder nor a Hub repo id.")
        return ModelRef(backend="hf", kind="hub", name=rest)

    if rest.startswith("hf-hub:"):
        repo = rest[len("hf-hub:"):]
        if not _HUB_ID.match(repo) or "/" not in repo:
            raise ModelReferenceError(f"Model reference {raw!r}: {repo!r} is not a Hub repo id of the form ORG/REPO.")
        return ModelRef(backend="open_clip", kind="hub", name=repo)
    if rest.startswith("local-dir:"):
        return _local("open_clip", raw, rest[len("local-dir:"):])
    if _looks_like_path(rest):
        raise ModelReferenceError(
            f"Model reference {raw!r} looks like a path; open_clip folders are written 'open_clip:local-dir:PATH'."
        )
    arch, _, tag = rest.partition("/")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", arch) or (tag and not re.match(r"^[A-Za-z0-9._-]+$", tag)):
        raise ModelReferenceError(f"Model reference {raw!r} is malformed. {_SYNTAX_HELP}")
    return ModelRef(backend="open_clip", kind="builtin", name=arch, pretrained=tag or None)
