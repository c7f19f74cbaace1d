"""Push a saved h-classifier folder to the Hugging Face Hub (`create_repo` + `upload_folder`).

The token comes from the `token` argument, else huggingface_hub's usual sources (the `HF_TOKEN` environment variable
or a cached `hf auth login`).
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id


REQUIRED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Never upload pickles or temporary files that might sit next to the classifier.
IGNORE_PATTERNS = ["*.pt", "*.pth", "*.bin", "*.ckpt", "*.pkl", ".tmp-*", ".old-*"]


def check_classifier_folder(folder: str | os.PathLike) -> Path:
    """The folder as a Path, after checking it holds a saved `HClassifier` (config.json + safetensors weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"`folder` {str(folder)!r} is not a directory (expected a saved h-classifier).")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"`folder` {str(folder)!r} lacks {missing}: expected the output of `HClassifier.save_pretrained` "
            "(e.g. `balancing-act train`)."
        )
    return folder


def push_classifier(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Creates (if needed) the model repo `repo_id` and uploads `folder` to it. Returns the repo URL."""
    folder = check_classifier_folder(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"`repo_id` {repo_id!r} is not a valid Hub repo id ('user/name' or 'name'): {error}"
        ) from None
    url = huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        token=token,
        revision=revision,
        commit_message=commit_message or "Upload Balancing Act h-classifier",
        ignore_patterns=IGNORE_PATTERNS,
    )
    return str(url)
