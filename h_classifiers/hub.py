"""Push a saved h-classifier folder to the Hugging Face Hub (`create_repo` + `upload_folder`).

The token comes from the `token` argument, else huggingface_hub's usual sources (the `HF_TOKEN` environment variable
or a cached `hf auth login`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id


REQUIRED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Never upload pickles or temporary files that might sit next to the classifier.
IGNORE_PATTERNS = ["*.pt", "*.pth", "*.bin", "*.ckpt", "*.pkl", ".tmp-*", ".old-*"]


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached (no network, offline mode, timeout): one line says so."""


def connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "no connection" for huggingface_hub: its offline mode, and the transport errors of
    its HTTP client (httpx, or its fork httpx2 in recent versions; requests where an older version uses it)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        if name in sys.modules:
            errors.append(sys.modules[name].TransportError)
    if "requests" in sys.modules:
        errors += [sys.modules["requests"].exceptions.ConnectionError, sys.modules["requests"].exceptions.Timeout]
    return tuple(errors)


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
    try:
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
    except connection_errors() as error:  # evaluated after the raise: the HTTP client's module is loaded by then
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubUnreachableError(
            f"the Hugging Face Hub is unreachable, nothing was pushed to {repo_id!r} ({cause}); check the network "
            "(and HF_HUB_OFFLINE), then push again."
        ) from None
    return str(url)
