"""The ways a user gets a BalancingActPipeline, all offline: custom_pipeline (local file, directory holding
`pipeline.py`, Hub repository holding `pipeline.py`, community name), from_pipe."""

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import OfflineModeIsEnabled
from tiny_models import ROOT, make_generator, tiny_classifier, tiny_sd_pipeline

from pipeline_balancing_act import BalancingActPipeline


PIPELINE_FILE = ROOT / "pipeline_balancing_act.py"
PROMPT = "a photo of a face"
GUIDED = {"guidance_mode": "distribution", "target_distribution": [0.5, 0.5], "guidance_strength": 50.0}
CALL = {"num_inference_steps": 2, "num_images_per_prompt": 2, "output_type": "np"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Dynamic modules are copied into a temporary HF_MODULES_CACHE, never into the user's cache."""
    cache = str(tmp_path / "modules")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(sys, "path", [*sys.path, cache])
    for name in [n for n in sys.modules if n.startswith("diffusers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    return cache


def check_guided_pipeline(pipe) -> None:
    assert type(pipe).__name__ == "BalancingActPipeline"
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPT, generator=make_generator(0), **CALL).images
    # a classifier from the installed package works with the class loaded by diffusers (a second module)
    guided = pipe(PROMPT, generator=make_generator(0), h_classifier=tiny_classifier(), **GUIDED, **CALL).images
    assert not np.allclose(plain, guided)
    reference = tiny_sd_pipeline()
    assert np.array_equal(plain, reference(PROMPT, generator=make_generator(0), **CALL).images)


def test_custom_pipeline_local_file(model_dir, modules_cache):
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    assert type(pipe).__module__ == "diffusers_modules.local.pipeline_balancing_act"  # diffusers' own copy
    assert (Path(modules_cache) / "diffusers_modules" / "local" / "pipeline_balancing_act.py").is_file()
    check_guided_pipeline(pipe)


def test_custom_pipeline_local_file_needs_trust_remote_code(model_dir, modules_cache):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(PIPELINE_FILE))


def test_custom_pipeline_directory_holding_pipeline_py(model_dir, modules_cache, tmp_path):
    """A directory is looked up for `pipeline.py` (what `balancing-act push --pipeline` names the file)."""
    folder = tmp_path / "my_pipeline"
    folder.mkdir()
    shutil.copy(PIPELINE_FILE, folder / "pipeline.py")
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(pipe).__module__ == "diffusers_modules.local.pipeline"
    check_guided_pipeline(pipe)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_hub_cache(tmp_path, monkeypatch, repo_folder: str, file_in_snapshot: str):
    """A Hub cache (HF_HOME in tmp_path) whose repo `repo_folder` holds the pipeline file at `file_in_snapshot` of its
    `main` revision; the Hub is offline (HF_HUB_OFFLINE), so files can only come from this cache."""
    hf_home = tmp_path / "hf_home"
    hub_cache = hf_home / "hub"
    repo = hub_cache / repo_folder
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    target = repo / "snapshots" / COMMIT / file_in_snapshot
    target.parent.mkdir(parents=True)
    shutil.copy(PIPELINE_FILE, target)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_custom_pipeline_hub_repo_holding_pipeline_py(model_dir, modules_cache, tmp_path, monkeypatch):
    """`custom_pipeline="user/repo"` loads the repo's `pipeline.py` (what `balancing-act push --pipeline user/repo`
    uploads), from the Hub cache."""
    offline_hub_cache(tmp_path, monkeypatch, "models--user--repo", "pipeline.py")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="user/repo")
    # diffusers 0.42 asks the Hub for the repo's commit (`model_info`) even when the file is cached, so this route
    # needs the network: offline it fails ...
    with pytest.raises(OfflineModeIsEnabled):
        DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="user/repo", trust_remote_code=True)
    # ... and with the Hub's answer given here (the cached commit), everything else comes from the cache.
    asked = []
    monkeypatch.setattr(
        dynamic_modules_utils,
        "model_info",
        lambda repo_id, revision=None, token=None: asked.append(repo_id) or SimpleNamespace(sha=COMMIT),
    )
    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="user/repo", trust_remote_code=True)
    assert asked == ["user/repo"]
    assert type(pipe).__module__ == f"diffusers_modules.local.user--repo.{COMMIT}.pipeline"
    check_guided_pipeline(pipe)


def test_custom_pipeline_community_name_from_the_mirror_cache(model_dir, modules_cache, tmp_path, monkeypatch):
    """`custom_pipeline="balancing_act"` resolves `v<version>/balancing_act.py` in the community mirror dataset
    (diffusers/community-pipelines-mirror, a copy of diffusers' examples/community folder). The file is not there:
    this test puts it in a local cache of the mirror, to check that the file loads by that route once it is."""
    import diffusers

    version = diffusers.__version__
    offline_hub_cache(
        tmp_path, monkeypatch, "datasets--diffusers--community-pipelines-mirror", f"v{version}/balancing_act.py"
    )
    # diffusers asks PyPI for its release list first: tests never touch the network.
    monkeypatch.setattr(dynamic_modules_utils, "get_diffusers_versions", lambda: [version])

    pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="balancing_act")
    assert type(pipe).__module__ == "diffusers_modules.git.balancing_act"
    check_guided_pipeline(pipe)


def test_from_pipe_of_a_loaded_stable_diffusion_pipeline():
    sd = tiny_sd_pipeline()
    pipe = BalancingActPipeline.from_pipe(sd)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae and pipe.text_encoder is sd.text_encoder
    check_guided_pipeline(pipe)
    back = StableDiffusionPipeline.from_pipe(pipe)
    assert type(back) is StableDiffusionPipeline and back.unet is sd.unet


def test_diffusion_pipeline_from_pipe_with_custom_pipeline(modules_cache):
    sd = tiny_sd_pipeline()
    pipe = DiffusionPipeline.from_pipe(sd, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    assert pipe.unet is sd.unet
    check_guided_pipeline(pipe)


def test_classifier_given_as_a_path_is_loaded_and_cached(fresh_ba_pipe, tmp_path):
    """A path string is loaded with HClassifier.from_pretrained (Hub ids take the same road) and cached (on a pipeline
    of its own: the shared one keeps no cache entry of this test)."""
    pipe = fresh_ba_pipe
    tiny_classifier(seed=9).save_pretrained(tmp_path / "skin")
    images = pipe(PROMPT, generator=make_generator(0), h_classifier=str(tmp_path / "skin"), **GUIDED, **CALL).images
    again = pipe(PROMPT, generator=make_generator(0), h_classifier=tiny_classifier(seed=9), **GUIDED, **CALL).images
    assert np.array_equal(images, again)
    assert torch.is_tensor(pipe._h_classifier_cache[str(tmp_path / "skin")][1].weight)
