"""One product, one lab. The installed package holds only the product; the research tools live in `lab/`, used from a
checkout's root (`python -m lab.<tool>` or `python lab/<tool>`) and never installed. Every file stays readable: no module
of the package grows past about 500 lines, and no file of the project outside the tests past 600."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import setuptools

from h_classifiers import cli


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "h_classifiers"
LAB = ROOT / "lab"
# The lab's command-line tools: a package (with __main__.py) or a file; each takes --help.
LAB_TOOLS = (
    "bench",
    "reproduce",
    "bench_multiprocess.py",
    "bench_solver.py",
    "bench_xl.py",
    "diffusers_fast_tests.py",
    "mode_gap.py",
    "reliability.py",
    "sweep_image_guidance.py",
    "toy_ddpm_ablation.py",
    "toy_report.py",
    "train_toy_ddpm.py",
    "train_toy_model.py",
    "train_toy_sdxl.py",
    "train_x0_classifier.py",
    "unconditional_examples.py",
    "usage_arguments.py",
)
# Tools that were commands of the package once: they must not come back there.
FORMER_COMMANDS = ("bench", "reproduce", "train_toy", "toy_report", "bench_multiprocess")
MAX_MODULE_LINES = 500
MAX_FILE_LINES = 600
# The community pipeline is one file by diffusers' convention (docs/DESIGN.md); its owner keeps it whole.
SINGLE_FILE_PIPELINES = ("pipeline_balancing_act.py",)
TEXT_SUFFIXES = (".py", ".sh", ".md", ".cfg", ".toml")
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "tests", ".work", "__pycache__"}


def installed_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    return setuptools.find_packages(where=str(ROOT), include=include)


def project_files() -> list[Path]:
    """The project's code and pages outside the tests (no build output, caches or virtual environments)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith(TEXT_SUFFIXES)]
    return found


def test_the_lab_is_outside_the_installed_package():
    for name in FORMER_COMMANDS:
        assert not (PACKAGE / "commands" / f"{name}.py").exists(), name
    for tool in LAB_TOOLS:
        assert (LAB / tool / "__main__.py").is_file() if "." not in tool else (LAB / tool).is_file(), tool
        assert not (ROOT / "scripts" / tool).exists(), tool
    assert (LAB / "bench_gpu.sh").is_file() and not (ROOT / "scripts" / "bench_gpu.sh").exists()
    assert not (ROOT / "benchmarks").exists()
    assert list(cli.COMMANDS) == ["generate", "extract", "train", "evaluate", "push"]
    packages = installed_packages()
    assert "h_classifiers" in packages and "h_classifiers.commands" in packages
    assert not [p for p in packages if p.split(".")[0] != "h_classifiers"], packages


def test_scripts_are_the_companion_entry_points_only():
    scripts = sorted(p.name for p in (ROOT / "scripts").iterdir())
    assert scripts == ["evaluate.py", "extract_h.py", "generate.py", "push_to_hub.py", "train_classifier.py"]
    for path in (ROOT / "scripts").iterdir():
        assert "from h_classifiers.commands." in path.read_text(), path.name  # the logic lives in the library


def test_package_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_file_outside_the_tests_grows_past_600_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in project_files()}
    assert len(sizes) > 50 and "lab/reproduce/render.py" in sizes and not any(p.startswith("tests/") for p in sizes)
    too_long = {name: n for name, n in sizes.items() if n > MAX_FILE_LINES and name not in SINGLE_FILE_PIPELINES}
    assert too_long == {}


def test_bench_writes_into_the_checkout_not_the_package():
    from lab.bench import config

    assert config.DEFAULT_OUTPUT_DIR == ROOT / "docs" / "lab" / "bench"
    assert PACKAGE not in config.DEFAULT_OUTPUT_DIR.parents


HELP_EACH = (
    "import runpy, sys\n"
    "for path in sys.argv[1:]:\n"
    "    sys.argv = [path, '--help']\n"
    "    try:\n"
    "        runpy.run_{how}(path, run_name='__main__'{extra})\n"
    "    except SystemExit as exit:\n"
    "        assert exit.code == 0, (path, exit.code)\n"
    "    print('ran', path)\n"
)


def run_help(code: str, targets: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *targets], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ran ") == len(targets)


def test_lab_tools_run_as_files_from_anywhere(tmp_path):
    """`python lab/<tool> --help` from another directory: each tool finds the checkout on its own."""
    run_help(HELP_EACH.format(how="path", extra=""), [str(LAB / tool) for tool in LAB_TOOLS], tmp_path)


def test_lab_tools_run_as_modules_from_the_checkouts_root():
    """`python -m lab.<tool> --help` from the checkout's root."""
    modules = [f"lab.{tool.removesuffix('.py')}" for tool in LAB_TOOLS]
    run_help(HELP_EACH.format(how="module", extra=", alter_sys=True"), modules, ROOT)
