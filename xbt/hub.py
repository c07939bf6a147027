"""Publishing adapter directories to the Hugging Face Hub and fetching them back.

An adapter directory is the same thing locally and on the Hub (see DESIGN.md):
``xbt_config.json``, ``projection/`` (ψ as stage 1 saves it), the peft adapter files at
the root, ``README.md`` (the model card) and ``eval/``. Only JSON, safetensors, Markdown
and PNG files travel in either direction: a pickle is neither uploaded nor downloaded.

Uploads use plain commits (``create_commit``), which any Hub-compatible endpoint
(``HF_ENDPOINT``) accepts; downloads go through ``snapshot_download`` and therefore
the standard cache, so ``HF_HUB_OFFLINE=1`` works once a revision has been fetched.

This module imports nothing heavy at load time: ``xbt push --help`` starts without torch.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, ModelLoadError, XBTError

logger = logging.getLogger(__name__)

CONFIG_NAME = "xbt_config.json"
CARD_NAME = "README.md"
_SHIPPED_SUFFIXES = (".json", ".safetensors", ".md", ".png")
# Hub patterns match with fnmatch, whose "*" crosses "/": these cover projection/ and eval/ too.
SHIPPED_PATTERNS = [f"*{suffix}" for suffix in _SHIPPED_SUFFIXES]


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


def attach_evaluation(folder: str | Path, eval_dir: str | Path) -> list[Path]:
    """Copy an ``xbt eval`` output (metrics.json, report.md, plots) into ``folder/eval``; returns the copies."""
    source, target = Path(eval_dir), Path(folder) / "eval"
    if not (source / "metrics.json").is_file():
        raise InputError(f"{str(source)!r} holds no metrics.json; pass the --output_dir folder of `xbt eval`.")
    target.mkdir(exist_ok=True)
    copies = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in {".json", ".md", ".png"}:
            copies.append(Path(shutil.copy2(path, target / path.name)))
    return copies


def push_adapter(
    folder: str | Path,
    repo_id: str,
    *,
    eval_dir: str | Path | None = None,
    token: str | None = None,
    private: bool = False,
    branch: str | None = None,
    commit_message: str = "Upload xbt adapter",
    keep_card: bool = False,
) -> str:
    """Commit an adapter directory to ``repo_id`` (created if needed); returns the commit id.

    ``eval_dir`` (an ``xbt eval`` output) is copied into ``eval/`` first. The model card
    (README.md) is rendered from the directory unless ``keep_card`` and one exists.
    The endpoint is huggingface_hub's (``HF_ENDPOINT``), the token ``token`` or ``HF_TOKEN``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .model_card import write_model_card

    folder = Path(folder)
    adapter_files(folder)  # validate before touching anything
    if eval_dir is not None:
        attach_evaluation(folder, eval_dir)
    if not (keep_card and (folder / CARD_NAME).is_file()):
        write_model_card(folder, repo_id=repo_id)
    files = adapter_files(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=branch)
    except Exception as error:
        raise XBTError(f"Pushing {str(folder)!r} to {repo_id!r} failed ({type(error).__name__}: {error}). "
                       f"Check the repo id, your token (HF_TOKEN) and the endpoint (HF_ENDPOINT).") from error
    logger.info("Pushed %d files to %s (commit %s)", len(files), repo_id, info.oid)
    return info.oid


@dataclass
class PushConfig:
    """Options of ``xbt push``."""

    adapter_dir: str = field(metadata={"help": "adapter directory written by `xbt train` / XBTModel.save_pretrained"})
    repo_id: str = field(metadata={"help": "Hub repo to commit to (created if needed), e.g. my-org/clip-upgrade-xbt"})
    eval_dir: str | None = field(default=None, metadata={
        "help": "an `xbt eval` output folder (with metrics.json) to publish with it under eval/"})
    private: bool = field(default=False, metadata={"help": "create the repo as private"})
    branch: str | None = field(default=None, metadata={"help": "push to this branch (created if needed), not main"})
    commit_message: str = field(default="Upload xbt adapter", metadata={"help": "commit message"})
    keep_card: bool = field(default=False, metadata={
        "help": "keep the directory's README.md instead of rendering the model card again"})

    def __post_init__(self):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as error:
            raise InputError(f"repo_id must be a Hub repo id (NAME or NAMESPACE/NAME), got {self.repo_id!r}: "
                             f"{error}") from error


def push_command(argv) -> int:
    """Publish an adapter directory (with its model card and optionally an evaluation) to the Hugging Face Hub."""
    from .config import parse_configs

    (options,) = parse_configs([PushConfig], argv, prog="xbt push", description=push_command.__doc__)
    commit = push_adapter(options.adapter_dir, options.repo_id, eval_dir=options.eval_dir, private=options.private,
                          branch=options.branch, commit_message=options.commit_message, keep_card=options.keep_card)
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
