"""The wheel holds the product and nothing else: built offline from a copy of this checkout (`pip wheel --no-deps
--no-build-isolation --no-index`), it has every module of the package, the three pipeline files and the committed
assets the quick starts use, and none of the lab, the docs, the tests or the research assets; it stays under 30 MB."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
MAX_WHEEL_BYTES = 30_000_000
# What a checkout holds beside its sources: never copied (the build must not see them, and they can be large).
NOT_SOURCES = (".git", ".venv", "venv", "build", "dist", "*.egg-info", ".work", ".whl", ".gl", "outputs", "runs")
CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache", "*.pyc")
PIPELINES = ("pipeline_balancing_act.py", "pipeline_balancing_act_unconditional.py", "pipeline_balancing_act_xl.py")
# The assets the quick starts use (README.md, docs/usage.md, docs/unconditional.md): the toy Stable Diffusion and its
# classifiers, the toy DDPM and its classifiers.
QUICK_START_ASSETS = (
    "h_classifiers/assets/toy-sd/model_index.json",
    "h_classifiers/assets/toy-sd/unet/diffusion_pytorch_model.safetensors",
    "h_classifiers/assets/toy-sd/vae/diffusion_pytorch_model.safetensors",
    "h_classifiers/assets/toy-sd/text_encoder/model.safetensors",
    "h_classifiers/assets/toy-ddpm/model_index.json",
    "h_classifiers/assets/toy-ddpm/unet/diffusion_pytorch_model.safetensors",
    *(
        f"h_classifiers/assets/classifiers/{prefix}{attribute}/{name}"
        for prefix in ("", "toy-ddpm/")
        for attribute in ("skin", "glasses", "hair")
        for name in ("config.json", "diffusion_pytorch_model.safetensors")
    ),
)
# Research, not product: none of it may reach the wheel, whatever path it takes.
RESEARCH_MARKS = (
    "lab/",
    "benchmarks/",
    "docs/",
    "tests/",
    "scripts/",
    "image_guidance",
    "x0",
    "toy-sd-deep",
    "toy_model",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("checkout") / "repo"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES, *CACHES))
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_NO_INDEX": "1"}
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*command, "--disable-pip-version-check", "-q", "-w", str(out)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def product_files() -> set[str]:
    """The files the wheel must hold: every module of the package, the pipeline files and every committed asset."""
    package = ROOT / "h_classifiers"
    modules = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    assets = {p.relative_to(ROOT).as_posix() for p in (package / "assets").rglob("*") if p.is_file()}
    return modules | assets | set(PIPELINES)


def test_the_wheel_holds_the_product_and_the_quick_start_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    contents = {n for n in names if ".dist-info/" not in n}
    assert contents == product_files()  # both ways: all of the product, and nothing else
    assert set(QUICK_START_ASSETS) <= contents
    assert {"h_classifiers/cli.py", "h_classifiers/commands/evaluate.py", *PIPELINES} <= contents
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "balancing-act = h_classifiers.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_wheel_holds_nothing_of_the_lab(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if any(mark in n for mark in RESEARCH_MARKS)] == []
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"h_classifiers", *PIPELINES}


def test_the_wheel_stays_small(wheel):
    size = wheel.stat().st_size
    assert size <= MAX_WHEEL_BYTES, f"{wheel.name}: {size / 1e6:.1f} MB > {MAX_WHEEL_BYTES / 1e6:.0f} MB"


def test_the_package_keeps_no_research_asset():
    """The source side of the same rule: the lab's assets and the removed deep toy are not under the package."""
    assets = ROOT / "h_classifiers" / "assets"
    assert sorted(p.name for p in assets.iterdir()) == ["classifiers", "toy-ddpm", "toy-sd"]
    assert sorted(p.name for p in (assets / "classifiers").iterdir()) == ["glasses", "hair", "skin", "toy-ddpm"]
    assert (ROOT / "lab" / "assets" / "toy-ddpm-x0" / "skin" / "config.json").is_file()
