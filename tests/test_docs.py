"""The documentation stands alone: every relative link of README.md and docs/ resolves to a file (and heading) in the
repository, no page or generated JSON under docs/ holds an absolute path of the machine that wrote it, and every
reproduction table is the rendering of its results."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "docs" / "lab"  # the lab's record: its pages and results (the user docs are docs/*.md)
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.json")])

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# [text](target "title") and ![alt](target); reference definitions `[name]: target`
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
# `../x` written outside a link (in a code span, say): it names a file too
PARENT_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w./-]*\w)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# An absolute path of a build machine: /work/..., /tmp/..., /root/..., /home/... (not inside a URL or a relative path)
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|tmp|root|home)/")


def prose(text: str) -> str:
    """The Markdown text without fenced code blocks and code spans (their brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as dashes, repeats numbered."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_pages_are_found():
    names = {relative(page) for page in PAGES}
    assert {"README.md", "docs/usage.md", "docs/guidance.md", "docs/lab/results.md"} <= names


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` that do not resolve to a file inside `root` (or to a heading of a page)."""
    broken = []
    for target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a URL (http, https, mailto): public, not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if resolved != root and root not in resolved.parents:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(root).as_posix()})")
    for target in PARENT_PATH.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        resolved = (page.parent / target).resolve()
        if resolved != root and root not in resolved.parents:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = broken_links(page)
    assert not broken, f"{relative(page)}: {broken}"


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_no_absolute_path_of_a_build_machine(path):
    found = [
        f"line {number}: {line.strip()[:120]}"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, f"{relative(path)} holds absolute paths of the machine that wrote it: {found}"


def test_the_checks_catch_what_they_name(tmp_path):
    """The checks themselves, on a repository made here: a missing file, a link out of the repository, a missing
    heading and a machine path are found; URLs, code, and good links and anchors are not."""
    root = tmp_path / "repo"
    (root / "docs" / "results").mkdir(parents=True)
    (root / "README.md").write_text("# Title\n\n## In Python\n\n## In Python\n")
    (root / "docs" / "results" / "plot.png").write_bytes(b"")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = root / "docs" / "page.md"
    page.write_text(
        "# A page\n[ok](../README.md) [ok](../README.md#in-python) [ok](../README.md#in-python-1) [self](#a-page)\n"
        "![img](results/plot.png) [web](https://example.org/a) [mail](mailto:a@example.org)\n"
        "[gone](missing.md) [out](../../outside.md) [anchor](../README.md#no-such-heading) [self](#nowhere)\n"
        "`[code](nowhere.md)`\n```bash\n[fenced](nowhere.md) ../../fenced.md\n```\n[ref]: missing-ref.md\n"
        "Read `../../shared/METHOD.md` or `../shared/METHOD.md` first; `../README.md` is fine.\n"
    )
    assert broken_links(page, root) == [
        "missing.md (no such file)",
        "../../outside.md (outside the repository)",
        "../README.md#no-such-heading (no heading #no-such-heading in README.md)",
        "#nowhere (no heading #nowhere in docs/page.md)",
        "missing-ref.md (no such file)",
        "../../outside.md (outside the repository)",
        "../../shared/METHOD.md (outside the repository)",
        "../shared/METHOD.md (no such file)",
    ]
    assert MACHINE_PATH.search('"model": "/work/main/h_classifiers/assets/toy-sd"')
    assert MACHINE_PATH.search("--output /tmp/report.json") and MACHINE_PATH.search("(/home/user/x)")
    assert not MACHINE_PATH.search("https://example.org/home/x, .work/toy-sd, ~/home/x, docs/tmp/x")


def rendered_pages() -> dict[str, tuple[str, str]]:
    """Every committed page the lab writes from a committed results file, as `{page: (committed text, the lab's
    rendering of its results now)}`."""
    import json

    from lab import (
        bench_multiprocess,
        bench_solver,
        bench_xl,
        classifier_size,
        diffusers_fast_tests,
        mode_gap,
        reliability,
        sweep_image_guidance,
        toy_ddpm_ablation,
        toy_sdxl_rows,
        train_toy_sdxl,
        unconditional_examples,
    )
    from lab.bench.table import markdown_table
    from lab.reproduce import render, rows
    from lab.train_toy_ddpm import report_markdown

    def read(path: Path):
        return json.loads(path.read_text(encoding="utf-8"))

    made = {}
    for world in rows.WORLDS.values():  # the reproduction tables and the sweeps each world runs
        for results in [
            world.output_dir / "results.json",
            *(world.output_dir / f"sweep_{s}.json" for s in rows.SWEEPS),
        ]:
            if results.exists():
                page, text = render.render_file(results)
                made[page] = text
    made[LAB / "results" / "reach_comparison.md"] = render.reach_comparison_page()
    sweep = LAB / "results" / "sweep_image_guidance.json"
    made[sweep.with_suffix(".md")] = sweep_image_guidance.markdown(read(sweep))
    made[LAB / "toy_ddpm_report.md"] = report_markdown(read(LAB / "toy_ddpm_report.json"))
    if (LAB / "toy_sdxl_report.json").exists():  # written by the toy SDXL's full training run
        made[LAB / "toy_sdxl_report.md"] = train_toy_sdxl.report_markdown(read(LAB / "toy_sdxl_report.json"))
    for folder in (LAB / "bench", LAB / "bench" / "celebahq"):  # the benchmark: the cost
        made[folder / "table.md"] = markdown_table(read(folder / "bench.json")) + "\n"
    bench = LAB / "bench"
    made[bench / "multiprocess.md"] = bench_multiprocess.markdown(read(bench / "multiprocess.json")) + "\n"
    made[bench / "solver.md"] = bench_solver.markdown(read(bench / "solver.json"))
    made[reliability.OUTPUT.with_suffix(".md")] = reliability.render(read(reliability.OUTPUT))
    for xl in (LAB / "bench_xl.json", *LAB.glob("bench_xl_*/bench_xl.json")):  # `python lab/bench_xl.py`, by hand
        if xl.exists():
            made[xl.with_suffix(".md")] = bench_xl.markdown(read(xl))
    fast_tests = LAB / "diffusers_fast_tests.json"
    if fast_tests.exists():  # written by `python -m lab.diffusers_fast_tests` on diffusers' test sources, by hand
        made[fast_tests.with_suffix(".md")] = diffusers_fast_tests.markdown(read(fast_tests))
    measured_by_hand = (
        ("classifier_size", classifier_size),
        ("toy_sdxl_rows", toy_sdxl_rows),
        ("mode_gap", mode_gap),
        ("toy_ddpm_ablation", toy_ddpm_ablation),
        ("unconditional_examples", unconditional_examples),
    )
    for name, module in measured_by_hand:  # run by hand on the toy DDPM (and its training checkpoints)
        for results in LAB.glob(f"{name}*.json"):
            made[results.with_suffix(".md")] = module.markdown(read(results))
    return {relative(page): (page.read_text(encoding="utf-8"), text) for page, text in made.items()}


def test_the_committed_tables_are_their_results_rendered():
    """Each table the lab writes (the README links them instead of quoting figures) is what the lab renders from its
    committed results now: nothing typed by hand, nothing left from an older renderer."""
    pages = rendered_pages()
    assert {
        "docs/lab/results/table.md",
        "docs/lab/results/unconditional/table.md",
        "docs/lab/results/sweep_strength.md",
    } <= set(pages)
    assert [page for page, (committed, rendered) in pages.items() if committed != rendered] == []


def test_the_result_tables_hold_no_time():
    """The reproduction tables and sweeps hold what the oracle reads, not how long the jobs took on a shared machine:
    the reproduction tables link the benchmark, which measures the cost."""
    pages = {page: text for page, (text, _) in rendered_pages().items() if page.startswith("docs/lab/results/")}
    timed = re.compile(r"(?i)wall time|time per image|seconds|\bmin\b")
    assert {page for page, text in pages.items() if timed.search(text)} == set()
    for table in ("docs/lab/results/table.md", "docs/lab/results/unconditional/table.md"):
        assert "[benchmark.md](" in pages[table]


# Result pages the lab no longer regenerates (their code left with the deep toy and the site sweep): each says so and
# names the commit that regenerates it.
RECORDS = (
    "docs/lab/results/deep/table.md",
    "docs/lab/results/deep/sweep_reach.md",
    "docs/lab/results/sweep_site.md",
    "docs/lab/results/h_dependence.md",
)


@pytest.mark.parametrize("record", RECORDS)
def test_a_record_names_the_commit_that_regenerates_it(record):
    text = (ROOT / record).read_text(encoding="utf-8")
    assert "> A record: the lab no longer regenerates this page" in text and "git checkout 7d1b3a3 && " in text


def test_every_generated_page_is_rendered_or_a_record():
    """A page that says it was generated is checked against its results, or says which commit regenerates it."""
    generated = {relative(page) for page in PAGES if page.read_text(encoding="utf-8").startswith("<!-- generated by")}
    assert generated - set(rendered_pages()) - set(RECORDS) == set()


# An option in the text: `--name` (not inside a longer word; `--num_images` is `--num-images`).
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])")
CLI_COMMANDS = ("generate", "evaluate", "extract", "train", "push")


def cli_options() -> dict[str, dict[str, object]]:
    """Each command's options (dashed spelling) -> its argparse action."""
    import importlib

    parsers = {name: importlib.import_module(f"h_classifiers.commands.{name}").build_parser() for name in CLI_COMMANDS}
    return {name: {o: a for a in p._actions for o in a.option_strings} for name, p in parsers.items()}


def dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-")


def test_every_option_docs_cli_shows_is_one_of_its_command_and_flags_are_shown_as_flags():
    """docs/cli.md showed `--save-images` as an on/off flag (it takes a directory): every option it names must be
    an option of the command it documents (the `balancing-act <command>` lines of its examples, the section of
    `generate` or `evaluate`), and the generate table says "off" exactly for the options that take no value."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    options = cli_options()
    every = set().union(*options.values())
    problems = []
    for block in FENCE.finditer(text):
        for line in re.split(r"(?<!\\)\n", block.group(0)):  # a command with its continuation lines
            command = re.search(r"balancing-act (\w+)", line)
            if command and command[1] in options:
                problems += [
                    f"{command[1]}: {o}" for o in OPTION.findall(line) if dashed(o) not in options[command[1]]
                ]
    for section in re.split(r"^## ", FENCE.sub("", text), flags=re.MULTILINE):
        title = re.match(r"`(\w+)`", section)
        allowed = options[title[1]] if title and title[1] in options else every
        problems += [f"section {section[:20]!r}: {o}" for o in OPTION.findall(section) if dashed(o) not in allowed]
        if title and title[1] == "generate":
            rows = re.findall(r"^\| (`--[^|]*?) \| ([^|]*?) \|", section, flags=re.MULTILINE)
            assert len(rows) >= 15
            for cell, default in rows:
                for option in OPTION.findall(cell):
                    is_flag = options["generate"][dashed(option)].nargs == 0
                    if is_flag != default.lower().startswith("off"):
                        problems.append(f"generate table: {option} shown with default {default!r}")
    assert not problems, problems
    documented = {dashed(o) for o in OPTION.findall(text.split("## `generate`")[1].split("## `evaluate`")[0])}
    hidden = {"--help", "-h"}
    assert {o for o in options["generate"] if o.startswith("--")} - hidden <= documented


def test_the_arguments_section_of_usage_is_the_pipelines_docstring():
    """docs/usage.md's "Arguments" section is `BalancingActPipeline.__call__`'s docstring entries of the Balancing Act
    arguments (`GUIDANCE_ARGS_DOCSTRING`, as `guidance_args_docstring` writes it), every one, in order, word for word:
    the arguments are documented once. `python lab/usage_arguments.py` rewrites the section."""
    from lab import usage_arguments
    from pipeline_balancing_act import BalancingActPipeline, GuidanceArguments

    text = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    assert text.count(usage_arguments.BEGIN) == 1 and text.count(usage_arguments.END) == 1
    assert usage_arguments.rewrite(text) == text, "docs/usage.md's arguments: run python lab/usage_arguments.py"
    section = text[text.index(usage_arguments.BEGIN) + len(usage_arguments.BEGIN) : text.index(usage_arguments.END)]
    entries = section.split("\n\nConstants named above")[0].strip().split("\n- ")
    names = [re.match(r"(?:- )?\*\*`(\w+)`\*\* ", entry)[1] for entry in entries]
    assert names == GuidanceArguments.names()
    # Each entry, read independently of the renderer: "name (kinds): description" is a run of the docstring's words.
    docstring = " ".join(BalancingActPipeline.__call__.__doc__.split())
    for name, entry in zip(names, entries):
        words = " ".join(re.sub(r"^(?:- )?\*\*`(\w+)`\*\*", r"\1", entry).split())
        assert words in docstring, name


def test_the_readme_names_the_arguments_usage_documents():
    """The README lists the Balancing Act arguments by name (no second table of them), all of them, in order."""
    from pipeline_balancing_act import GuidanceArguments

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = re.search(r"^The arguments Balancing Act adds.*?(?=\n\n)", text, flags=re.MULTILINE | re.DOTALL)[0]
    assert "(docs/usage.md#arguments)" in paragraph
    assert re.findall(r"`(\w+)`", paragraph.split(":", 1)[1]) == GuidanceArguments.names()
