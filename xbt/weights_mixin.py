"""``SafeModelHubMixin``: huggingface_hub's ``PyTorchModelHubMixin`` as xbt's small modules use it.

Two changes to the mixin, for every module saved as ``config.json`` + ``model.safetensors``
(ψ, the uncertainty head):

- a repo or folder without ``model.safetensors`` is refused: the mixin would fall back to
  ``torch.load`` of a pickle, and xbt never unpickles a downloaded file;
- loading a local folder prints nothing: the mixin ``print``s a line on every local load,
  which would land in the middle of a command's own output (``xbt embed`` / ``xbt plan``).
"""

from __future__ import annotations

import os

from huggingface_hub import PyTorchModelHubMixin, constants

from .errors import ModelLoadError


class SafeModelHubMixin(PyTorchModelHubMixin):
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download: bool, local_files_only: bool,
                         token, map_location: str = "cpu", strict: bool = False, **model_kwargs):
        if not os.path.isdir(model_id):  # a Hub repo: the mixin's download (safetensors, else _load_as_pickle)
            return super()._from_pretrained(model_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token, map_location=map_location, strict=strict, **model_kwargs)
        return cls._load_as_safetensor(cls(**model_kwargs), os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE),
                                       map_location, strict)

    @classmethod
    def _load_as_pickle(cls, model, model_file, map_location, strict):
        raise ModelLoadError(f"{model_file} is a pickle; xbt loads {cls.__name__} weights from model.safetensors only.")
