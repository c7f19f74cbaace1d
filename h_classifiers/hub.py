"""Push to the Hugging Face Hub: a saved h-classifier folder (`create_repo` + `upload_folder`), or the pipeline file
as a Hub repository's `pipeline.py` (`create_repo` + `upload_file`), which diffusers loads with
`DiffusionPipeline.from_pretrained(model, custom_pipeline="user/repo", trust_remote_code=True)`.

The token comes from the `token` argument, else huggingface_hub's usual sources (the `HF_TOKEN` environment variable
or a cached `hf auth login`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id


REQUIRED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Never upload pickles or temporary files that might sit next to the classifier.
IGNORE_PATTERNS = ["*.pt", "*.pth", "*.bin", "*.ckpt", "*.pkl", ".tmp-*", ".old-*"]
# diffusers' name for the custom pipeline file of a Hub repository (`custom_pipeline="user/repo"`).
HUB_PIPELINE_FILE = "pipeline.py"
PIPELINE_MODULE = "pipeline_balancing_act"
# The unconditional and SDXL pipelines import the core from `pipeline_balancing_act.py` beside them (diffusers fetches
# that relative import from the same repo).
UNCONDITIONAL_PIPELINE_MODULE = "pipeline_balancing_act_unconditional"
XL_PIPELINE_MODULE = "pipeline_balancing_act_xl"


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


def check_repo_id(repo_id: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"`repo_id` {repo_id!r} is not a valid Hub repo id ('user/name' or 'name'): {error}"
        ) from None
    return repo_id


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """Turns "no connection" (see `connection_errors`) inside the block into one `HubUnreachableError` line."""
    try:
        yield
    except connection_errors() as error:  # evaluated after the raise: the HTTP client's module is loaded by then
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubUnreachableError(
            f"the Hugging Face Hub is unreachable, nothing was pushed to {repo_id!r} ({cause}); check the network "
            "(and HF_HUB_OFFLINE), then push again."
        ) from None


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
    check_repo_id(repo_id)
    with hub_errors(repo_id):
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


def pipeline_file(module: str = PIPELINE_MODULE) -> Path:
    """The path of the installed `<module>.py` (found without importing it: no diffusers import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise FileNotFoundError(
            f"`{module}.py` is not importable here: install this repository (`pip install -e .`) or run from its root."
        )
    return Path(spec.origin)


def push_pipeline(
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    file: str | os.PathLike | None = None,
    unconditional: bool = False,
    xl: bool = False,
) -> str:
    """Creates (if needed) the model repo `repo_id` and uploads the pipeline file (`file`, default: the installed
    `pipeline_balancing_act.py`; with `unconditional` `pipeline_balancing_act_unconditional.py`, with `xl`
    `pipeline_balancing_act_xl.py`, each uploaded after the core file it imports) to it as `pipeline.py`, the file
    diffusers loads for `DiffusionPipeline.from_pretrained(model, custom_pipeline=repo_id, trust_remote_code=True)`.
    Returns the repo URL.
    """
    if unconditional and xl:
        raise ValueError("`unconditional` and `xl` name two pipelines; a repo's pipeline.py is one of them.")
    module = UNCONDITIONAL_PIPELINE_MODULE if unconditional else XL_PIPELINE_MODULE if xl else PIPELINE_MODULE
    file = pipeline_file(module) if file is None else Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"`file` {str(file)!r} is not a file (expected {module}.py).")
    core = pipeline_file() if module != PIPELINE_MODULE else None
    check_repo_id(repo_id)
    with hub_errors(repo_id):
        url = huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if core is not None:
            huggingface_hub.upload_file(
                path_or_fileobj=str(core),
                path_in_repo=core.name,
                repo_id=repo_id,
                repo_type="model",
                token=token,
                revision=revision,
                commit_message=commit_message or f"Upload the Balancing Act core as {core.name}",
            )
        huggingface_hub.upload_file(
            path_or_fileobj=str(file),
            path_in_repo=HUB_PIPELINE_FILE,
            repo_id=repo_id,
            repo_type="model",
            token=token,
            revision=revision,
            commit_message=commit_message or f"Upload the Balancing Act pipeline as {HUB_PIPELINE_FILE}",
        )
    return str(url)
