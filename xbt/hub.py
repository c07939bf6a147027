"""Publishing adapter directories to the Hugging Face Hub and fetching them back.

An adapter directory is the same thing locally and on the Hub (see DESIGN.md):
``xbt_config.json``, ``projection/`` (ψ as stage 1 saves it), the peft adapter files at
the root, ``README.md`` (the model card) and ``eval/``. Only JSON, safetensors, Markdown
and PNG files travel in either direction: a pickle is neither uploaded nor downloaded.

A push is portable and leaves nothing behind: model references that exist only on this
machine (local folders) are refused unless their public reference is named, and that is
what the pushed ``xbt_config.json`` records; the card and ``eval/`` are prepared in a
temporary copy (the adapter directory is never written); one ``upload_folder`` commit
makes the repo's tree exactly the new one (safetensors go through LFS or Xet, whichever
the endpoint offers). A README someone wrote is kept. Downloads go through
``snapshot_download`` and therefore the standard cache, so ``HF_HUB_OFFLINE=1`` works
once a revision has been fetched.

This module imports nothing heavy at load time: ``xbt push --help`` starts without torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ModelLoadError, ModelReferenceError, XBTError
from .io import atomic_write_json
from .references import ADAPTER_PREFIX, BACKENDS, ModelRef, parse_reference

logger = logging.getLogger(__name__)

CONFIG_NAME = "xbt_config.json"
CARD_NAME = "README.md"
_SHIPPED_SUFFIXES = (".json", ".safetensors", ".md", ".png")
# Hub patterns match with fnmatch, whose "*" crosses "/": these cover projection/ and eval/ too.
SHIPPED_PATTERNS = [f"*{suffix}" for suffix in _SHIPPED_SUFFIXES]
ROLES = {"new": "new_model", "old": "old_model"}
"""``--public_ref`` names -> the xbt_config.json entry of that model."""


def adapter_files(folder: str | Path) -> list[Path]:
    """The files of an adapter directory that are published, after checking it is one.

    Raises :class:`InputError` when the folder is missing, holds no ``xbt_config.json``,
    or holds pickle files (which xbt never publishes).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Adapter directory {str(folder)!r} does not exist.")
    if not (folder / CONFIG_NAME).is_file():
        raise InputError(f"{str(folder)!r} is not an xbt adapter directory (no {CONFIG_NAME}); "
                         f"create one with XBTModel.save_pretrained or `xbt train`.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    pickles = [str(p.relative_to(folder)) for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    if pickles:
        raise InputError(f"{str(folder)!r} holds pickle files {pickles}; xbt publishes safetensors only. "
                         f"Remove them before pushing.")
    return [p for p in files if p.suffix in _SHIPPED_SUFFIXES and len(p.relative_to(folder).parts) <= 2]


def attach_evaluation(folder: str | Path, eval_dir: str | Path) -> None:
    """Make ``folder/eval`` a copy of an ``xbt eval`` output (metrics.json, report.md, plots).

    What ``folder/eval`` held before is removed: a published evaluation is one run's, whole.
    """
    source, target = Path(eval_dir), Path(folder) / "eval"
    if not (source / "metrics.json").is_file():
        raise InputError(f"{str(source)!r} holds no metrics.json; pass the --output_dir folder of `xbt eval`.")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in {".json", ".md", ".png"}:
            shutil.copy2(path, target / path.name)


def needs_public_reference(reference: str) -> bool:
    """Whether a model reference can only be loaded on this machine (a local folder, or one that is gone)."""
    try:
        return parse_reference(reference).kind == "local"
    except ModelReferenceError:  # e.g. a recorded folder that no longer exists: no other machine has it either
        return True


def check_public_refs(public_refs: Mapping[str, str]) -> None:
    """Raise :class:`InputError` unless ``public_refs`` maps ``new`` / ``old`` to references that load anywhere."""
    for role, reference in public_refs.items():
        if role not in ROLES:
            raise InputError(f"--public_ref names models as new=REFERENCE or old=REFERENCE, got {role!r}.")
        if needs_public_reference(reference):
            raise InputError(f"--public_ref {role}={reference} is not a public reference: name a Hub repo "
                             f"(hf:ORG/REPO, open_clip:hf-hub:ORG/REPO) or an open_clip ARCH/TAG.")


def published_config(config: dict[str, Any], public_refs: Mapping[str, str]) -> dict[str, Any]:
    """``xbt_config.json`` as it is published: every model reference one that loads anywhere.

    ``public_refs`` maps ``new`` / ``old`` to the public reference of a model recorded as
    a local folder. Raises :class:`InputError` for a local reference left without one.
    """
    check_public_refs(public_refs)
    published = json.loads(json.dumps(config))
    for role, public in public_refs.items():
        published[ROLES[role]]["reference"] = public
    local = [(role, published[key]["reference"]) for role, key in ROLES.items()
             if published[key].get("reference") and needs_public_reference(published[key]["reference"])]
    if local:
        named = ", ".join(f"the {role} model {reference!r}" for role, reference in local)
        example = " ".join(f"{role}={hub_reference(reference, 'ORG/REPO')}" for role, reference in local)
        raise InputError(f"{named} only exist{'s' if len(local) == 1 else ''} on this machine, so the pushed adapter "
                         f"would not load anywhere else. Name the public reference of the same weights with "
                         f"--public_ref {example} (or another public reference, e.g. open_clip:ARCH/TAG), or "
                         f"publish the folder with --push_base {' '.join(f'{role}=ORG/REPO' for role, _ in local)}.")
    return published


def hub_reference(reference: str, repo_id: str) -> str:
    """The reference of the Hub repo ``repo_id`` for the backend of ``reference`` (``hf:``, ``open_clip:hf-hub:``,
    or ``xbt:`` for an adapter as the old side)."""
    try:
        backend = parse_reference(reference).backend  # a bare adapter folder too
    except ModelReferenceError:  # a recorded folder that is gone: its prefix still tells the backend
        backend = reference.partition(":")[0]
    known = (*BACKENDS, ADAPTER_PREFIX)
    return str(ModelRef(backend=backend if backend in known else "hf", kind="hub", name=repo_id))


def base_model_refs(config: dict[str, Any], push_base: Mapping[str, str]) -> dict[str, str]:
    """The public references the local base models will have once pushed as ``push_base`` ({role: repo id})."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    refs = {}
    for role, repo_id in push_base.items():
        if role not in ROLES:
            raise InputError(f"--push_base names models as new=ORG/REPO or old=ORG/REPO, got {role!r}.")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise InputError(f"--push_base {role}={repo_id} is not a Hub repo id: {error}") from error
        local = config[ROLES[role]].get("reference")
        if not local or not needs_public_reference(local):
            raise InputError(f"--push_base {role}=...: the {role} model {local!r} is not a local folder; "
                             f"there is nothing to push.")
        refs[role] = hub_reference(local, repo_id)
    return refs


def push_base_models(api, config: dict[str, Any], push_base: Mapping[str, str], private: bool) -> None:
    """Publish each local base model folder named in ``push_base`` as its Hub repo (safetensors only)."""
    from .backbones.safety import require_safetensors

    for role, repo_id in push_base.items():
        ref = parse_reference(config[ROLES[role]]["reference"])
        require_safetensors(ref.path, ref)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=ref.path, commit_message=f"Upload the {role} model of an "
                          f"xbt adapter (fingerprint {config[ROLES[role]]['fingerprint']})")
        logger.info("Pushed the %s model %s to %s", role, ref, repo_id)


def verify_public_weights(config: dict[str, Any], published: dict[str, Any]) -> None:
    """Load each model whose reference was replaced and check it is the recorded one (same fingerprint).

    A public reference naming other weights would give a repo that fails on every other machine.
    """
    from .encoders import load_encoder

    for role, key in ROLES.items():
        recorded, public = config[key], published[key]["reference"]
        if public == recorded.get("reference"):
            continue
        loaded = load_encoder(public).model_id  # the old side may be an adapter (a chained upgrade)
        if loaded != recorded["fingerprint"]:
            raise InputError(f"The public reference {public} of the {role} model is another model than the one "
                             f"this adapter records ({recorded['reference']}): fingerprint {loaded}, recorded "
                             f"{recorded['fingerprint']}. Name the public copy of the very same weights.")


def stage_adapter(folder: Path, staging: Path, config: dict[str, Any], published: dict[str, Any], repo_id: str,
                  eval_dir: str | Path | None) -> None:
    """Copy what is published of ``folder`` into ``staging``, with the published config and evaluation.

    The local references replaced in ``published`` (and the adapter folder's own path) are
    replaced in every staged text file too (the config's training summary, peft's
    adapter_config.json, an evaluation's metrics.json / report.md name what they were made
    with); a README is left as written.
    """
    for path in adapter_files(folder):
        target = staging / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if eval_dir is not None:
        attach_evaluation(staging, eval_dir)
    atomic_write_json(staging / CONFIG_NAME, published)
    replacements = {config[key]["reference"]: published[key]["reference"] for key in ROLES.values()
                    if config[key].get("reference") != published[key]["reference"]}
    replacements[str(folder.resolve())] = repo_id
    for path in staging.rglob("*"):
        if path.suffix in {".json", ".md"} and path.name != CARD_NAME:
            text = path.read_text(encoding="utf-8")
            for local in sorted(replacements, key=len, reverse=True):  # the most specific first
                text = text.replace(local, replacements[local])
            path.write_text(text, encoding="utf-8")


def remote_card(api, repo_id: str, revision: str | None) -> str | None:
    """The README.md the repo holds now, or ``None`` when it has none."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(api.hf_hub_download(repo_id, CARD_NAME, revision=revision)).read_text(encoding="utf-8")
    except EntryNotFoundError:
        return None


def choose_card(staging: Path, repo_id: str, remote: str | None, replace_card: bool) -> str:
    """Put the card to publish into ``staging``; returns where it came from.

    A card someone wrote (no xbt mark) is kept, the local one first, then the repo's, unless
    ``replace_card``; otherwise the card is rendered from the staged directory.
    """
    from .model_card import is_generated, write_model_card

    local = staging / CARD_NAME
    if not replace_card:
        if local.is_file() and not is_generated(local.read_text(encoding="utf-8")):
            return "the adapter directory's own README.md"
        if remote is not None and not is_generated(remote):
            local.write_text(remote, encoding="utf-8")
            return "the README.md already in the repo"
    write_model_card(staging, repo_id=repo_id)
    return "rendered"


def push_adapter(
    folder: str | Path,
    repo_id: str,
    *,
    eval_dir: str | Path | None = None,
    public_refs: Mapping[str, str] | None = None,
    push_base: Mapping[str, str] | None = None,
    replace_card: bool = False,
    token: str | None = None,
    private: bool = False,
    branch: str | None = None,
    commit_message: str = "Upload xbt adapter",
) -> str:
    """Make ``repo_id`` (created if needed) hold exactly this adapter directory; returns the commit id.

    Model references recorded as local folders need a public one: named in ``public_refs``
    (``{"new"|"old": REFERENCE}``), or made by pushing the folder as a Hub repo
    (``push_base``, ``{"new"|"old": REPO_ID}``); either is checked by fingerprint. Everything
    is prepared in a temporary copy, so the adapter directory is never written: the config
    with the public references, ``eval/`` from ``eval_dir`` (an ``xbt eval`` output), and the
    model card (see :func:`choose_card`). The one commit replaces the repo's whole tree: files
    of an earlier push that are not in this one are deleted. The endpoint is huggingface_hub's
    (``HF_ENDPOINT``), the token ``token`` or ``HF_TOKEN``.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    adapter_files(folder)  # validate before anything else
    config = json.loads((folder / CONFIG_NAME).read_text())
    push_base = push_base or {}
    published = published_config(config, {**(public_refs or {}), **base_model_refs(config, push_base)})
    with tempfile.TemporaryDirectory(prefix="xbt-push-") as tmp:
        staging = Path(tmp)
        stage_adapter(folder, staging, config, published, repo_id, eval_dir)
        api = HfApi(token=token)
        with hub_errors(f"Pushing the base models {dict(push_base)} of {str(folder)!r}"):
            push_base_models(api, config, push_base, private)
        verify_public_weights(config, published)
        with hub_errors(f"Pushing {str(folder)!r} to {repo_id!r}"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            remote = None if replace_card else remote_card(api, repo_id, branch)
            card = choose_card(staging, repo_id, remote, replace_card)
            # "*" lists every remote file for deletion; the ones uploaded again are kept by upload_folder.
            info = api.upload_folder(repo_id=repo_id, folder_path=staging, revision=branch,
                                     commit_message=commit_message, delete_patterns="*")
    logger.info("Pushed %s to %s (commit %s; model card: %s)", folder, repo_id, info.oid, card)
    return info.oid


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn a failure of the Hub client into an :class:`XBTError` that says what failed and what to check."""
    try:
        yield
    except XBTError:
        raise
    except Exception as error:
        raise XBTError(f"{what} failed ({type(error).__name__}: {error}). "
                       f"Check the repo id, your token (HF_TOKEN) and the endpoint (HF_ENDPOINT).") from error


@dataclass
class PushConfig:
    """Options of ``xbt push``."""

    adapter_dir: str = field(metadata={"help": "adapter directory written by `xbt train` / XBTModel.save_pretrained"})
    repo_id: str = field(metadata={"help": "Hub repo to commit to (created if needed), e.g. my-org/clip-upgrade-xbt"})
    eval_dir: str | None = field(default=None, metadata={
        "help": "an `xbt eval` output folder (with metrics.json) to publish with it under eval/"})
    public_ref: dict[str, str] = field(default_factory=dict, metadata={
        "help": "public references of models the adapter records as local folders, e.g. new=hf:org/clip-new "
                "old=open_clip:hf-hub:org/clip-old; written into the pushed xbt_config.json (checked by fingerprint)"})
    push_base: dict[str, str] = field(default_factory=dict, metadata={
        "help": "push local base model folders too, as these Hub repos, e.g. old=org/clip-old (created if needed); "
                "the pushed xbt_config.json then names them"})
    replace_card: bool = field(default=False, metadata={
        "help": "render the model card even over a README.md someone wrote (in the adapter directory or the repo)"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    branch: str | None = field(default=None, metadata={"help": "push to this branch (created if needed), not main"})
    commit_message: str = field(default="Upload xbt adapter", metadata={"help": "commit message"})

    def __post_init__(self):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as error:
            raise InputError(f"repo_id must be a Hub repo id (NAME or NAMESPACE/NAME), got {self.repo_id!r}: "
                             f"{error}") from error
        check_public_refs(self.public_ref)


def push_command(argv) -> int:
    """Publish an adapter directory (with its model card and optionally an evaluation) to the Hugging Face Hub."""
    from .config import parse_configs

    (options,) = parse_configs([PushConfig], argv, prog="xbt push", description=push_command.__doc__)
    commit = push_adapter(options.adapter_dir, options.repo_id, eval_dir=options.eval_dir,
                          public_refs=options.public_ref, push_base=options.push_base,
                          replace_card=options.replace_card, private=options.private, branch=options.branch,
                          commit_message=options.commit_message)
    print(f"{options.repo_id}@{commit}")
    return 0


def download_adapter(repo_id: str, revision: str | None = None, *, token: str | bool | None = None,
                     cache_dir: str | Path | None = None, force_download: bool = False,
                     local_files_only: bool = False) -> Path:
    """Fetch an adapter repo (JSON, safetensors, Markdown, PNG only) into the Hub cache; returns its folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only,
                                      allow_patterns=SHIPPED_PATTERNS))
    except Exception as error:
        raise ModelLoadError(
            f"Could not fetch the adapter repo {repo_id!r}{f' at revision {revision!r}' if revision else ''} "
            f"({type(error).__name__}: {error}). Check the repo id and network, or pass a local folder; "
            f"with HF_HUB_OFFLINE=1 only revisions fetched before are available."
        ) from error
