"""Publishing adapter directories to the Hugging Face Hub and fetching them back.

An adapter directory is the same thing locally and on the Hub (see DESIGN.md):
``xbt_config.json``, ``projection.safetensors``, the peft adapter files at the root,
``README.md`` (the model card) and ``eval/``. Only JSON, safetensors, Markdown and
PNG files travel in either direction: a pickle is neither uploaded nor downloaded.

Uploads use plain commits (``create_commit``), which any Hub-compatible endpoint
(``HF_ENDPOINT``) accepts; downloads go through ``snapshot_download`` and therefore
the standard cache, so ``HF_HUB_OFFLINE=1`` works once a revision has been fetched.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .errors import InputError, ModelLoadError, XBTError

logger = logging.getLogger(__name__)

CONFIG_NAME = "xbt_config.json"
CARD_NAME = "README.md"
SHIPPED_PATTERNS = ["*.json", "*.safetensors", "*.md", "eval/*.json", "eval/*.png", "eval/*.md"]
_SHIPPED_SUFFIXES = {".json", ".safetensors", ".md", ".png"}


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
        raise InputError(f"{str(source)!r} holds no metrics.json; pass the --output folder of `xbt eval`.")
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


def push_command(argv) -> int:
    """``xbt push ADAPTER_DIR REPO_ID``: publish an adapter directory with its model card."""
    import argparse

    parser = argparse.ArgumentParser(prog="xbt push", description=push_command.__doc__)
    parser.add_argument("adapter_dir", help="folder written by `xbt train` / XBTModel.save_pretrained")
    parser.add_argument("repo_id", help="Hub repo, e.g. my-org/clip-upgrade-xbt")
    parser.add_argument("--eval", dest="eval_dir", help="an `xbt eval --output` folder to publish with it")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--branch", help="push to this branch instead of main")
    parser.add_argument("--message", default="Upload xbt adapter", help="commit message")
    parser.add_argument("--keep-card", action="store_true", help="keep an existing README.md instead of rendering")
    options = parser.parse_args(argv)
    commit = push_adapter(options.adapter_dir, options.repo_id, eval_dir=options.eval_dir, private=options.private,
                          branch=options.branch, commit_message=options.message, keep_card=options.keep_card)
    print(f"{options.repo_id}@{commit}")
    return 0


def download_adapter(repo_id: str, revision: str | None = None, *, token: str | None = None,
                     cache_dir: str | Path | None = None) -> Path:
    """Fetch an adapter repo (JSON, safetensors, Markdown, PNG only) into the Hub cache; returns its folder."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      allow_patterns=SHIPPED_PATTERNS))
    except Exception as error:
        raise ModelLoadError(
            f"Could not fetch the adapter repo {repo_id!r}{f' at revision {revision!r}' if revision else ''} "
            f"({type(error).__name__}: {error}). Check the repo id and network, or pass a local folder; "
            f"with HF_HUB_OFFLINE=1 only revisions fetched before are available."
        ) from error
