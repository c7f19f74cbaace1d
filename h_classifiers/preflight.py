"""What the commands check before they import torch, diffusers or the pipeline: a bad argument is one argparse line
at once, instead of after seconds of imports (the commands import the heavy modules only once these checks pass).

It holds:

- the names the parsers offer (schedulers, model dtypes, evaluation configurations, labeller kinds, record branches),
  defined here and re-exported by the modules that use them (`evaluation`, `extraction`, `labellers`);
- copies of the few constants and rules of `pipeline_balancing_act` the checks need (the pipeline is a single-file
  community pipeline that imports diffusers first; tests/test_preflight.py keeps the copies equal to the originals),
  and of `feature_store.STORAGE_DTYPES`' names;
- what a model's and a classifier's files say without loading them: the model's kind (`model_index.json`) and the
  shape of h at the mid block (`unet/config.json`), so that a classifier trained for another model is refused
  before anything loads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .toy_assets import ATTRIBUTES, TOY_MODEL_CLASSIFIERS, committed_toy_model


# ----------------------------------------------------------------------------------------------------------------
# Names offered by the parsers
# ----------------------------------------------------------------------------------------------------------------

CONFIGURATIONS = ("vanilla", "sample", "distribution", "prompt", "fair_diffusion", "selection")
# Run only when asked for: selection may generate 20 x the images.
OPT_IN_CONFIGURATIONS = ("selection",)
DEFAULT_CONFIGURATIONS = tuple(c for c in CONFIGURATIONS if c not in OPT_IN_CONFIGURATIONS)
# The baselines that write the class into the prompt: text-to-image models only.
TEXT_CONFIGURATIONS = ("prompt", "fair_diffusion")

# Scheduler names accepted by the command-line tools: class name in diffusers and the config overrides that make it
# the variant people mean by that name.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the torch dtypes of `evaluation.DTYPES`
STORAGE_DTYPE_NAMES = ("fp16", "fp32")  # the keys of `feature_store.STORAGE_DTYPES`
RECORD_BRANCHES = ("cond", "uncond", "both")
LABELLER_KINDS = ("toy", "hf", "clip")

# ----------------------------------------------------------------------------------------------------------------
# Copies of pipeline_balancing_act's (tests/test_preflight.py checks they are equal)
# ----------------------------------------------------------------------------------------------------------------

MAX_GUIDANCE_STRENGTH = 50.0
DISTRIBUTION_SOLVERS = ("assign", "kl", "chi2")
GUIDED_BRANCHES = ("cond", "both")
TARGET_SUM_TOLERANCE = 1e-3
MID_BLOCK_SITE = "mid_block"


def looks_like_local_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a local path rather than a Hub id ('user/name'): absolute, starting with '.' or '~',
    ending with a separator, with more than one '/', or with a parent directory that exists here."""
    path = os.fspath(path)
    if os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(("/", os.sep)):
        return True
    if path.replace(os.sep, "/").count("/") > 1:  # a Hub id has at most one
        return True
    return os.path.isdir(os.path.dirname(path) or ".")


# ----------------------------------------------------------------------------------------------------------------
# Models: kind, path, h shape
# ----------------------------------------------------------------------------------------------------------------

# A model whose model_index.json names one of these pipelines, or whose UNet is a `UNet2DModel` beside no text
# encoder, is unconditional: it loads as `BalancingActUnconditionalPipeline` and takes no prompt.
UNCONDITIONAL_PIPELINES = ("DDIMPipeline", "DDPMPipeline", "BalancingActUnconditionalPipeline")
# A model whose model_index.json names one of these pipelines, or lists a second text encoder or tokenizer, is an SDXL
# base model: it loads as `BalancingActXLPipeline`.
XL_PIPELINES = ("StableDiffusionXLPipeline", "BalancingActXLPipeline")
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
# What `--model` accepts, for the messages about a model that is not there.
MODEL_EXPECTED = (
    "expected a diffusers pipeline folder saved with `save_pretrained` (with model_index.json): Stable Diffusion "
    "1.x/2.x, SDXL, or an unconditional DDIMPipeline / DDPMPipeline; or a Hub id such as "
    "'stable-diffusion-v1-5/stable-diffusion-v1-5', 'stabilityai/stable-diffusion-xl-base-1.0' or "
    "'google/ddpm-celebahq-256'"
)


def is_local_model(model: str | os.PathLike) -> bool:
    model = os.fspath(model)
    return os.path.isabs(model) or model.startswith(".") or os.path.exists(model)


def model_index(model: str | os.PathLike) -> dict[str, Any] | None:
    """The model's `model_index.json` (a local folder's, or a Hub id's from the Hub or its cache), or None when it
    cannot be read (loading the model then says what is wrong)."""
    model = os.fspath(model)
    try:
        if is_local_model(model):
            path = os.path.join(model, "model_index.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "model_index.json")
        with open(path, encoding="utf-8") as file:
            index = json.load(file)
    except Exception:  # no such file or repo, offline, unreadable: the model's loading gives the real error
        return None
    return index if isinstance(index, dict) else None


def unconditional_model_class(model: str | os.PathLike) -> str | None:
    """The pipeline class an unconditional model was saved as (`UNCONDITIONAL_PIPELINES`, or the pipeline of a
    `UNet2DModel` without a text encoder); None for a text-to-image model or one whose index cannot be read."""
    index = model_index(model)
    if index is None:
        return None
    name = str(index.get("_class_name"))
    unet = index.get("unet")
    if name in UNCONDITIONAL_PIPELINES:
        return name
    if isinstance(unet, list) and unet[-1:] == ["UNet2DModel"] and "text_encoder" not in index:
        return name
    return None


def xl_model_class(model: str | os.PathLike) -> str | None:
    """The pipeline class an SDXL model was saved as (`XL_PIPELINES`, or any pipeline whose index lists
    `text_encoder_2` or `tokenizer_2`); None for another model or one whose index cannot be read. A Hub id's index
    comes from the Hub or its cache (`model_index`)."""
    index = model_index(model)
    if index is None:
        return None
    name = str(index.get("_class_name"))
    return name if name in XL_PIPELINES or any(key in index for key in XL_COMPONENTS) else None


def unconditional_scheduler_error(scheduler: str) -> str:
    return (
        f"`--scheduler {scheduler}`: an unconditional model samples with DDIM only (its pipeline is a DDIMPipeline; "
        "`--eta` 0 is deterministic DDIM, 1 adds DDPM-like noise); leave `--scheduler` at ddim."
    )


def check_model_path(model: str | os.PathLike, argument: str = "--model") -> None:
    """A local model that is not there fails at once, naming `argument`: a path that does not exist, a file, or a
    folder without model_index.json (a Hub id passes: its loading says what is wrong)."""
    path = os.fspath(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"`{argument}` {path!r} has no model_index.json; {MODEL_EXPECTED}.")
    elif os.path.exists(path):
        raise FileNotFoundError(f"`{argument}` {path!r} is a file; {MODEL_EXPECTED}.")
    elif looks_like_local_path(path):
        raise FileNotFoundError(f"`{argument}` {path!r} does not exist; {MODEL_EXPECTED}.")


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")


def _int_list(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        and (length is None or len(value) == length)
    )


def unet_h_shape(model: str | os.PathLike, height: int | None = None, width: int | None = None) -> list[int] | None:
    """The per-sample shape `[C, H, W]` of h = the mid block's output when a local `model` samples at its default
    resolution (its UNet's `sample_size`, in latents or pixels), or at `height` x `width` pixels where given (divided
    by the VAE's scale factor, read from vae/config.json), read from unet/config.json by the rule of the pipeline's
    `mid_block_h_shape`: every down block but the last halves the size (rounding up). None when the files do not say
    (a Hub id, another UNet class, missing fields, no mid block): the pipeline then checks the shape at its first
    call."""
    config = read_json(Path(model) / "unet" / "config.json")
    if config is None or config.get("_class_name") not in UNET_CLASSES:
        return None
    channels, size = config.get("block_out_channels"), config.get("sample_size")
    down, up = config.get("down_block_types"), config.get("up_block_types")
    size = [size, size] if isinstance(size, int) else size
    if not (_int_list(channels) and _int_list(size, 2) and isinstance(down, list) and isinstance(up, list)):
        return None
    if not (len(channels) == len(down) == len(up) >= 1):
        return None
    if height is not None or width is not None:
        scale = _vae_scale_factor(model)
        if scale is None or any(n is not None and n % scale for n in (height, width)):
            return None  # the pipeline refuses a size that is not a multiple of its VAE's scale
        size = [size[0] if height is None else height // scale, size[1] if width is None else width // scale]
    sizes = [list(size)]
    for _ in range(len(down) - 1):
        sizes.append([math.ceil(n / 2) for n in sizes[-1]])
    if "mid_block_type" in config and config["mid_block_type"] is None:  # no mid block
        return None
    return [channels[-1], *sizes[-1]]


def _vae_scale_factor(model: str | os.PathLike) -> int | None:
    """Pixels per latent of a local model: 2 ** (VAE blocks - 1), as diffusers' pipelines compute it; 1 for a model
    without a VAE (a pixel-space UNet); None when its vae/config.json does not say."""
    if not (Path(model) / "vae").exists() and "vae" not in (read_json(Path(model) / "model_index.json") or {}):
        return 1
    channels = (read_json(Path(model) / "vae" / "config.json") or {}).get("block_out_channels")
    return 2 ** (len(channels) - 1) if _int_list(channels) and channels else None


def check_classifier_fits(
    classifier: str | os.PathLike,
    model: str | os.PathLike,
    classifier_argument: str = "--classifier",
    model_argument: str = "--model",
    height: int | None = None,
    width: int | None = None,
) -> None:
    """A local classifier folder trained on h of another shape than the local model gives (at its default resolution,
    or at `height` x `width` pixels where given), or at another site than the mid block: a one-line `ValueError` naming
    both arguments, before anything loads. Silent when the files do not say (a Hub id, an unreadable config): the
    pipeline checks at its first call."""
    config = read_json(Path(classifier) / "config.json")
    if config is None or not _int_list(config.get("h_shape")):
        return
    site = config.get("site", MID_BLOCK_SITE)
    if site != MID_BLOCK_SITE:
        raise ValueError(
            f"`{classifier_argument}` {os.fspath(classifier)!r} reads h at site {site!r}; only {MID_BLOCK_SITE!r} is "
            "supported (up-block sites were removed). Retrain it with `balancing-act extract` / `train`."
        )
    expected, pool = unet_h_shape(model, height, width), config.get("pool_size")
    if expected is None or list(config["h_shape"]) == expected:
        return
    if isinstance(pool, int) and expected[0] == config["h_shape"][0] and min(expected[1:]) >= pool:
        return  # a pooled classifier reads h of any height and width of at least its grid
    attribute = config.get("attribute")
    hint = ""
    toy = committed_toy_model(model)
    if toy is not None:  # a committed toy model: its own classifiers are shipped
        shipped = TOY_MODEL_CLASSIFIERS[toy] / str(attribute)
        if attribute in ATTRIBUTES and (shipped / "config.json").is_file():
            hint = f" (its shipped {attribute} classifier: {_shown(shipped)})"
        else:
            hint = f" (its shipped classifiers: {_shown(TOY_MODEL_CLASSIFIERS[toy])}/<attribute>)"
    reads = f"was trained on h of shape {list(config['h_shape'])}"
    if isinstance(pool, int):
        reads = (
            f"reads h of shape [{config['h_shape'][0]}, H, W] with H, W >= {pool} (average-pooled to {pool}x{pool})"
        )
    at = "" if height is None and width is None else f" at the asked size (`--height` {height}, `--width` {width})"
    raise ValueError(
        f"`{classifier_argument}` {os.fspath(classifier)!r} ({attribute!r}) {reads}, but `{model_argument}` "
        f"{os.fspath(model)!r} gives h of shape {expected}{at}; use a classifier trained for this model{hint}."
    )


def check_pool_size(pool_size: int | None, h_shape: list[int] | None, argument: str = "--pool-size") -> None:
    """A pool size must be a positive integer no larger than h's height and width (`h_shape` [C, H, W]; None when
    unknown: only the integer is checked): a one-line `ValueError` naming `argument` otherwise."""
    if pool_size is None:
        return
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(
            f"`{argument}` must be a positive integer (the grid h is average-pooled to), got {pool_size!r}."
        )
    if h_shape is not None and len(h_shape) == 3 and pool_size > min(h_shape[1:]):
        raise ValueError(
            f"`{argument}` {pool_size} is larger than h, whose shape is {list(h_shape)}; give at most "
            f"{min(h_shape[1:])}."
        )


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Labellers
# ----------------------------------------------------------------------------------------------------------------


def check_labeller_spec(spec: str, argument: str = "labeller", words: tuple[str, ...] = ()) -> None:
    """A labeller spec's form: `toy:ATTRIBUTE` (an attribute of the toy world), `hf:MODEL_ID_OR_PATH` or
    `clip:MODEL_ID_OR_PATH`, or one of `words` (the commands' 'auto', 'none'); a one-line `ValueError` naming
    `argument` otherwise."""
    if spec in words:
        return
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in LABELLER_KINDS:
        accepted = [repr(word) for word in words] + ["'toy:ATTRIBUTE'", "'hf:MODEL_ID_OR_PATH'"]
        raise ValueError(f"`{argument}` must be {', '.join(accepted)} or 'clip:MODEL_ID_OR_PATH', got {spec!r}.")
    if kind == "toy" and target not in ATTRIBUTES:
        raise ValueError(
            f"`{argument}` {spec!r}: the toy oracle reads the attributes {list(ATTRIBUTES)}; got {target!r}."
        )
