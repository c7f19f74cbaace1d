"""diffusers' own `StableDiffusionXLPipeline` fast tests, run against stock SDXL and against `BalancingActXLPipeline`.

    pip install parameterized requests-mock    # imported by diffusers' test modules
    python -m lab.diffusers_fast_tests .work/diffusers-<commit> --note "..."  # docs/lab/diffusers_fast_tests.{json,md}

The argument is a folder holding diffusers' `tests/` (`git archive <commit> tests` of a diffusers clone; not
committed here; the installed diffusers is what is tested). The class `StableDiffusionXLPipelineFastTests` runs twice
with pytest, one thread: as it is, then with its `pipeline_class` and the test module's `StableDiffusionXLPipeline`
(for the tests that build the pipeline by that name) replaced by `BalancingActXLPipeline`, called without
`guidance_mode`. The tests whose outcome differs run a third time, ours also set in `diffusers.pipelines` (where a
test looks the class up by name). The tests load `hf-internal-testing/tiny-random-clip` from the Hub: this file, as
the pytest plugin `-p lab.diffusers_fast_tests`, loads the committed tiny tokenizer (tests/fixtures/tiny_tokenizer)
in its place, so slices computed with the real one can fail in both runs; the criterion is the comparison.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "lab" / "diffusers_fast_tests"
TEST_FILE = "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py"
TEST_CLASS = "StableDiffusionXLPipelineFastTests"
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tiny_tokenizer"
RUNS = {"stock": "StableDiffusionXLPipeline", "ours": "BalancingActXLPipeline"}
# which run the plugin patches for: "stock", "ours", or "registered" (ours, also set as an attribute of
# `diffusers.pipelines`, as a class diffusers ships is: run on the tests whose outcome differs)
ENV = "BALANCING_ACT_FAST_TESTS"
# Why a test that passes against stock SDXL does not pass against ours: the investigation, written by hand.
EXPLAINED = {
    "test_encode_prompt_works_in_isolation": "Inherent to a class diffusers does not ship: the test reads "
    "`encode_prompt`'s return names from the source of `getattr(diffusers.pipelines, cls.__name__).encode_prompt`, "
    "and `diffusers.pipelines` has no `BalancingActXLPipeline`. Set there (last column), the test passes: the images "
    "made from `encode_prompt`'s embeddings are those made from the prompt. It first stopped earlier, on a defect "
    "now fixed: the override that takes the tokenizer locks showed `(*args, **kwargs)` to `inspect.signature` "
    "(`Required parameter 'args' in encode_prompt has no default`); it now shows the arguments and documentation of "
    "`StableDiffusionXLPipeline.encode_prompt` (`functools.wraps`; tests/test_pipeline_xl.py).",
}


# The pytest plugin: the hooks run only in the subprocesses `run` starts (`-p lab.diffusers_fast_tests`).
def pytest_configure(config):
    from transformers import CLIPTokenizer

    original = CLIPTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, str(TOKENIZER_DIR) if name == HUB_TOKENIZER else name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)


def pytest_collection_modifyitems(session, config, items):
    from diffusers import StableDiffusionXLPipeline

    import pipeline_balancing_act_xl
    from pipeline_balancing_act_xl import BalancingActXLPipeline

    if ROOT not in Path(pipeline_balancing_act_xl.__file__).resolve().parents:
        raise RuntimeError(f"{pipeline_balancing_act_xl.__file__} is not this checkout's ({ROOT}).")
    ours = os.environ.get(ENV) in ("ours", "registered")
    if os.environ.get(ENV) == "registered":
        import diffusers.pipelines

        diffusers.pipelines.BalancingActXLPipeline = BalancingActXLPipeline
    for item in items:
        if ours and item.cls.pipeline_class is StableDiffusionXLPipeline:
            item.cls.pipeline_class = BalancingActXLPipeline
        if ours and item.module.StableDiffusionXLPipeline is StableDiffusionXLPipeline:
            item.module.StableDiffusionXLPipeline = BalancingActXLPipeline
        # read back by `outcomes`: the class each test ran against
        item.user_properties.append(("pipeline_class", item.cls.pipeline_class.__name__))


def outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """Each test's outcome (passed, failed, error, skipped) and, unless passed, its reason's first line."""
    tests = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                text = found.get("message") or found.text or ""
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                outcome, reason = name, (lines[0] if lines else "")[:240]
                break
        ran = {p.get("value") for p in case.iter("property") if p.get("name") == "pipeline_class"}
        tests[case.get("name")] = {"outcome": outcome, "reason": reason, "pipeline_class": "/".join(sorted(ran))}
    return dict(sorted(tests.items()))


def run(source: Path, which: str, select: str | None, slow: bool) -> dict[str, Any]:
    """One pytest run of the class; its outcomes and wall time."""
    env = os.environ | {ENV: which, "RUN_SLOW": str(int(slow)), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", f"{source / TEST_FILE}::{TEST_CLASS}", "-q", "-rfEs"]
        command += ["-p", "lab.diffusers_fast_tests", "-p", "no:cacheprovider", "-c", os.devnull]
        command += ["--rootdir", str(source), "-o", "timeout=1200", f"--junitxml={junit}"]
        command += ["-k", select] if select else []
        start = time.monotonic()
        subprocess.run(command, env=env, cwd=source, check=False)
        seconds = time.monotonic() - start
        return {"pipeline_class": RUNS.get(which, RUNS["ours"]), "seconds": round(seconds), "tests": outcomes(junit)}


def code(text: str) -> str:
    """`text` as a Markdown code span inside a table cell (it may hold backticks and pipes)."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def counts(tests: dict[str, dict[str, str]]) -> dict[str, int]:
    return {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "error", "skipped")}


def differences(report: dict[str, Any]) -> list[str]:
    stock, ours = report["runs"]["stock"]["tests"], report["runs"]["ours"]["tests"]
    outcome = {name: (stock.get(name, {}).get("outcome"), ours.get(name, {}).get("outcome")) for name in stock | ours}
    return sorted(name for name, (s, o) in outcome.items() if s != o)


def markdown(report: dict[str, Any]) -> str:
    d, runs = report["diffusers"], report["runs"]
    lines = [
        "<!-- generated by python -m lab.diffusers_fast_tests: do not edit by hand -->",
        "# diffusers' SDXL fast tests against `BalancingActXLPipeline`",
        "",
        f"diffusers {d['version']} installed (torch {report['torch']}, transformers {report['transformers']}, CPU, one "
        f"thread). Tests: `{TEST_FILE}::{TEST_CLASS}` of diffusers commit `{d['tests_commit']}` ({d['tests_note']}).",
        "",
        "The class runs twice: as it is (`pipeline_class = StableDiffusionXLPipeline`), then with `pipeline_class` "
        "and the test module's name `StableDiffusionXLPipeline` (the tests that build the pipeline themselves) bound "
        "to `BalancingActXLPipeline`, which the tests call without `guidance_mode`.",
        "",
        f"**Tokenizer substituted**: {report['tokenizer']}",
        "",
        f"Selection: {report['selection']}.",
        "",
        "| Run | Pipeline class | Passed | Failed | Error | Skipped | Wall time |",
        "|---" * 7 + "|",
    ]
    for which, r in runs.items():
        c = counts(r["tests"])
        lines.append(
            f"| {which} | `{r['pipeline_class']}` | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | "
            f"{r['seconds'] / 60:.1f} min |"
        )
    differ = differences(report)
    lines += ["", "## Tests whose outcome differs", ""]
    if not differ:
        lines.append("None: every test has the same outcome against both classes.")
    else:
        registered = report["registered"]["tests"]
        lines += [
            "| Test | Stock | Ours | Reason (ours) | Why | Ours, set in `diffusers.pipelines` |",
            "|---" * 6 + "|",
        ]
        for name in differ:
            s, o = runs["stock"]["tests"].get(name, {}), runs["ours"]["tests"].get(name, {})
            reason = code(o.get("reason") or s.get("reason") or "")
            why = report["explained"].get(name, "").replace("|", "\\|")
            again = registered.get(name, {}).get("outcome")
            lines.append(f"| `{name}` | {s.get('outcome')} | {o.get('outcome')} | {reason} | {why} | {again} |")
    lines += ["", "## Tests that fail or are skipped in both runs", ""]
    lines += ["| Test | Outcome | Reason (stock) | Same reason against ours |", "|---" * 4 + "|"]
    for name, s in runs["stock"]["tests"].items():
        if s["outcome"] != "passed" and name not in differ:
            same = "yes" if runs["ours"]["tests"][name]["reason"] == s["reason"] else "no"
            lines.append(f"| `{name}` | {s['outcome']} | {code(s['reason'])} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="A folder holding diffusers' tests/ (of the commit --commit).")
    parser.add_argument("--commit", help="The tests' diffusers commit (default: from a diffusers-<commit> name).")
    parser.add_argument("--note", default="", help="How that commit relates to the installed diffusers.")
    parser.add_argument("-k", dest="select", help="A pytest -k expression: run a subset (the page says which).")
    parser.add_argument("--slow", action="store_true", help="RUN_SLOW=1: also the class's tests marked @slow.")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="Writes OUTPUT.json and .md.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # run as a file from anywhere: h_classifiers
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    from lab import write_record

    source = args.source.resolve()
    commit = args.commit or source.name.removeprefix("diffusers-")
    size = len(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    slow = ", with `RUN_SLOW=1` (its `@slow` tests, on tiny components too, run)" if args.slow else ", no `RUN_SLOW`"
    report = {
        "diffusers": {"version": diffusers.__version__, "tests_commit": commit, "tests_note": args.note},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizer": f"`{HUB_TOKENIZER}` (not in the Hugging Face cache, no network) is loaded from the committed "
        f"tiny byte-level BPE tokenizer `tests/fixtures/tiny_tokenizer` ({size} tokens, within the tests' text "
        "encoder vocabulary of 1000), so the slices diffusers computed with the real one need not match.",
        "selection": (f"`-k {args.select}`" if args.select else "the whole class") + slow,
        "runs": {which: run(source, which, args.select, args.slow) for which in RUNS},
    }
    differ = differences(report)
    report["explained"] = {name: EXPLAINED.get(name, "(not investigated)") for name in differ}
    # The differing tests again, with ours set in `diffusers.pipelines` (where a test looks a class up by name).
    report["registered"] = run(source, "registered", " or ".join(differ), args.slow) if differ else {"tests": {}}
    write_record(args.output, report, markdown)
    return report


if __name__ == "__main__":
    main()
