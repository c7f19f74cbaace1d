"""The installed package holds only the product: research tools live in `lab/` (run from a checkout, never
installed), and no module of the package grows past about 500 lines."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import setuptools

from h_classifiers import cli


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "h_classifiers"
RESEARCH_TOOLS = {
    "bench": "bench",  # a package: python -m lab.bench, or python lab/bench
    "reproduce": "reproduce",  # a package: python -m lab.reproduce, or python lab/reproduce
    "train_toy": "train_toy_model.py",
    "toy_report": "toy_report.py",
    "bench_multiprocess": "bench_multiprocess.py",
}
MAX_MODULE_LINES = 500


def installed_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    include = config["options.packages.find"]["include"].split()
    return setuptools.find_packages(where=str(ROOT), include=include)


def test_research_tools_are_outside_the_installed_package():
    for old, new in RESEARCH_TOOLS.items():
        assert not (PACKAGE / "commands" / f"{old}.py").exists(), old
        assert not (ROOT / "scripts" / new).exists(), new
        assert (ROOT / "lab" / new).exists(), new
    assert (ROOT / "lab" / "bench_gpu.sh").is_file() and not (ROOT / "scripts" / "bench_gpu.sh").exists()
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


def test_bench_writes_into_the_checkout_not_the_package():
    from lab.bench import config

    assert config.DEFAULT_OUTPUT_DIR == ROOT / "docs" / "bench"
    assert PACKAGE not in config.DEFAULT_OUTPUT_DIR.parents


def test_benchmark_tools_run_as_files_from_a_checkout(tmp_path):
    """`python lab/<name>.py --help` from another directory: each file finds the repository on its own."""
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (path, exit.code)\n"
        "    print('ran', path)\n"
    )
    paths = [str(ROOT / "lab" / name) for name in RESEARCH_TOOLS.values()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *paths], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ran ") == len(paths)
