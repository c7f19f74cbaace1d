"""The reproduction table (`lab.reproduce`): the measures of the table, the choice rule of the sweeps, and a tiny end-to-end run."""

import json

import pytest
import torch

from h_classifiers.toy_world import ATTRIBUTES, TOY_MODEL_PATH
from lab.reproduce import cli, jobs, measures, pool, render, rows, runner


def fake_result(skin, glasses, valid, asked=None, hair=None):
    n = len(skin)
    return {
        "valid": valid,
        "labels": {"skin": skin, "glasses": glasses, "hair": hair or [0] * n},
        "asked": asked,
        "num_images": n,
    }


def test_measure_fractions_fd_hits_and_entanglement():
    row = rows.Row("r", ("skin",), (0.5, 0.5))
    vanilla = fake_result([0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1])
    # 4 images, the last invalid: skin 2 light / 1 dark over the valid ones, glasses 1/3 with (vanilla 1/2)
    result = fake_result([0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 0], asked=[0, 1, 1, 1])
    summary = measures.measure(result, row, vanilla)
    assert summary["fractions"]["skin"] == pytest.approx([2 / 3, 1 / 3])
    assert summary["fd"] == pytest.approx(((2 / 3 - 0.5) ** 2 * 2) ** 0.5)
    assert summary["valid_rate"] == 0.75
    assert summary["hit_strict"] == 0.5 and summary["hit_valid"] == pytest.approx(2 / 3)  # the invalid hit is a miss
    assert summary["entanglement"]["glasses"] == pytest.approx(0.5 - 1 / 3)
    assert summary["entanglement"]["hair"] == 0.0


def test_measure_joint_rows_over_the_cells():
    row = rows.Row("j", ("skin", "glasses"), ((0.25, 0.25), (0.25, 0.25)))
    result = fake_result([0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1])
    summary = measures.measure(result, row, result)
    assert summary["cell_fractions"] == [0.25, 0.25, 0.25, 0.25] and summary["fd"] == 0.0


def test_the_sweeps_choice_keeps_the_valid_rate_then_takes_the_lowest_fd():
    def entry(strength, fd, valid):
        settings = {"guidance_strength": strength}
        return {
            "configuration": "distribution",
            "settings": settings,
            "fd": fd,
            "valid_rate": valid,
            "vanilla_valid": 0.9,
        }

    results = [entry(3, 0.05, 0.9), entry(5, 0.02, 0.895), entry(8, 0.01, 0.85)]
    assert runner.choose(results)["settings"] == {"guidance_strength": 5}


def test_job_keys_share_vanilla_per_sampler_and_differ_per_row():
    table, by_row = jobs.table_jobs([rows.ROWS_BY_NAME["skin-50-50"], rows.ROWS_BY_NAME["glasses-50-50"]], 4, 0)
    assert by_row["skin-50-50"]["vanilla"].key == by_row["glasses-50-50"]["vanilla"].key
    assert by_row["skin-50-50"]["distribution"].key != by_row["glasses-50-50"]["distribution"].key
    assert len(table) == 1 + 2 * 6  # sample, kl, distribution, prompt, Fair Diffusion, selection


def test_reproduce_rejects_unknown_rows(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--rows", "skin-50-50,skin-99-1"])
    assert "--rows" in capsys.readouterr().err


@pytest.mark.skipif(not (TOY_MODEL_PATH / "model_index.json").exists(), reason="the committed toy model is missing")
def test_a_tiny_table_on_the_toy_model_writes_results_table_and_figures(tmp_path):
    argv = [
        "--rows",
        "skin-50-50",
        "--num-images",
        "4",
        "--output-dir",
        str(tmp_path),
        "--jobs-dir",
        str(tmp_path / "jobs"),
    ]
    report = cli.main(argv)
    row = report["rows"]["skin-50-50"]
    assert set(row["configurations"]) == {
        "vanilla",
        "sample",
        "kl",
        "distribution",
        "prompt",
        "fair_diffusion",
        "selection",
    }
    selection = row["configurations"]["selection"]["selection"]
    # The pool: the vanilla job's 4 images, then vanilla jobs on the next seeds only as far as the counts need.
    chunks = pool.pool_chunks(4, 80)
    assert chunks == [range(4), range(4, 68), range(68, 80)]
    made = [(tmp_path / "jobs" / f"{pool.pool_job(rows.Sampler(), 0, c).key}.json").exists() for c in chunks]
    assert made == [chunk.start < selection["images_generated"] for chunk in chunks]
    results = [json.loads(p.read_text()) for p in (tmp_path / "jobs").iterdir()]
    assert all(len(r["valid"]) == r["num_images"] for r in results)
    assert all(r["num_images"] == 4 for r in results if r["seed"] == 0)  # the pool's next chunks start at seed 4
    table = (tmp_path / "table.md").read_text()
    assert "distribution, default (assign)" in table and "Fair Diffusion" in table
    assert "## Selection: images generated per image kept" in table and "| skin 50/50 | [2, 2] |" in table
    assert (tmp_path / "fractions_skin-50-50.png").exists() and (
        tmp_path / "grid_skin-50-50_distribution.png"
    ).exists()
    # a second run finds every job done and only merges
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "jobs").iterdir()}
    cli.main(argv)
    assert before == {p.name: p.stat().st_mtime for p in (tmp_path / "jobs").iterdir()}


def test_the_reach_sweep_asks_every_class_and_reports_what_was_reached_without_a_choice():
    reach = {row.name: row for row in rows.REACH_ROWS}
    assert set(reach) == {f"reach-{a}-{c}" for a, classes in ATTRIBUTES.items() for c in classes}
    assert reach["reach-hair-red"].target == (0.0, 0.0, 1.0) and reach["reach-hair-red"].configurations == ("sample",)
    result = {
        "row": "reach-glasses-without",
        "configuration": "sample",
        "settings": {"guidance_strength": 5.0},
        "fd": 0.2,
        "valid_rate": 0.9,
        "vanilla_valid": 0.95,
        "hit_strict": 0.7,
        "hit_valid": 0.75,
        "reached": 0.75,
        "vanilla_reached": 0.6,
        "entanglement_max": 0.05,
    }
    report = {"sweep": "reach", "num_images": 8, "seed": 1, "results": [result]}
    table = render.sweep_markdown(report)
    assert "Chosen" not in table and "75.0% (60.0%)" in table and "70.0% / 75.0%" in table


def test_the_job_rows_target_counts_are_the_pipelines_apportionment_and_sum_to_the_images():
    """Rounding each class's share gave [171, 171, 171] for a uniform 512-image hair job: 513 images."""
    row = rows.ROWS_BY_NAME["hair-uniform-job"]
    n = 512
    result = fake_result([0] * n, [0] * n, [1] * n, hair=[k % 3 for k in range(n)])
    result["balance_state_counts"] = [171, 171, 170]
    summary = measures.measure(result, row, result)
    assert summary["target_counts"] == [171, 171, 170] and sum(summary["target_counts"]) == n
    seven = fake_result([0] * 7, [0] * 7, [1] * 7)
    row = rows.Row("s", ("skin",), (0.3, 0.7), balance_state=True)
    assert measures.measure(seven | {"balance_state_counts": [2, 5]}, row, seven)["target_counts"] == [2, 5]


def test_beating_fair_diffusion_shows_both_fds_and_both_valid_rates():
    row = rows.ROWS_BY_NAME["skin-50-50"]
    measured = {
        "vanilla": {"fd": 0.3, "valid_rate": 0.95, "entanglement_max": None},
        "distribution": {"fd": 0.01, "valid_rate": 0.90, "entanglement_max": 0.0},
        "fair_diffusion": {"fd": 0.05, "valid_rate": 0.93, "entanglement_max": 0.0},
    }
    value, threshold, met = measures.check_targets(row, measured)["beats Fair Diffusion"]
    assert value == (0.01, 0.05, 0.90, 0.93) and threshold is None and not met  # lower FD, but fewer valid images
    entry = {
        "title": "skin 50/50",
        "sampler": "DDIM 25, CFG 7.5",
        "batch_size": 64,
        "balance_state": False,
        "classifiers": "shipped",
        "configurations": {},
        "targets": {"beats Fair Diffusion": (value, None, met)},
    }
    report = {
        "num_images": 8,
        "seed": 0,
        "settings": {"fair_diffusion": {}},
        "processes": 1,
        "machine": "test",
        "rows": {"skin-50-50": entry},
    }
    table = render.table_markdown(report)
    assert "| beats Fair Diffusion | FD 0.010 vs 0.050, valid 90.0% vs 93.0% |  | **missed** |" in table


def test_the_unconditional_world_runs_marginal_and_eta0_rows_on_the_toy_ddpm(tmp_path):
    argv = ["--world", "ddpm", "--rows", "skin-glasses-50-50,hair-uniform-eta0", "--num-images", "4"]
    report = cli.main([*argv, "--output-dir", str(tmp_path), "--jobs-dir", str(tmp_path / "jobs")])
    assert report["world"] == "ddpm"
    marginal = report["rows"]["skin-glasses-50-50"]
    assert marginal["title"] == "skin 50/50 + glasses 50/50" and marginal["sampler"] == "DDIM 50, eta 1"
    for summary in marginal["configurations"].values():
        per_attribute = summary["fd_per_attribute"]
        assert set(per_attribute) == {"skin", "glasses"} and summary["fd"] == max(per_attribute.values())
        assert summary["entanglement"].keys() == {"hair"}  # only the attribute not guided
    eta0 = report["rows"]["hair-uniform-eta0"]
    assert eta0["sampler"] == "DDIM 50, eta 0" and set(eta0["configurations"]) == {
        "vanilla",
        "sample",
        "chi2",
        "distribution",
    }
    written = [json.loads(p.read_text()) for p in (tmp_path / "jobs").iterdir()]
    assert {j["sampler"]["eta"] for j in written} == {0.0, 1.0} and all(j["num_images"] == 4 for j in written)
    table = (tmp_path / "table.md").read_text()
    assert "# Reproduction table (toy DDPM)" in table and "paper's soft chi-square" in table
    header = "| Row | Sampler | Batch | Configuration | Measured | FD | Valid | Hit (strict / valid) | Entanglement |"
    assert header in table.splitlines() and "Time per image" not in table  # the cost is the benchmark's


def test_the_hold_sweep_holds_every_other_attribute():
    from types import SimpleNamespace

    from h_classifiers.toy_world import ToyOracle

    calls = []

    class Kit:
        oracle = ToyOracle()

        def pipe(self, sampler):
            def call(**kwargs):
                calls.append(kwargs)
                return SimpleNamespace(images=torch.zeros(len(kwargs["generator"]), 3, 32, 32))

            return call

        def classifier(self, attribute, source):
            return attribute

    row = rows.ROWS_BY_NAME["skin-30-70"]
    for hold in (False, True):
        job = jobs.Job("distribution", row.sampler, 2, 0, row, (("hold", hold),))
        jobs.run_job(job, Kit())
    free, held = calls
    assert free["h_classifier"] == "skin" and free["target_distribution"] == [0.3, 0.7] and "hold" not in free
    assert held["h_classifier"] == ["skin", "glasses", "hair"]
    assert held["target_distribution"] == [[0.3, 0.7], "hold", "hold"]


def test_the_reach_comparison_puts_each_sweeps_reach_of_a_class_side_by_side():
    def result(row, strength, reached):
        return {
            "row": row,
            "settings": {"guidance_strength": strength},
            "reached": reached,
            "vanilla_reached": 0.3,
            "valid_rate": 0.9,
            "entanglement_max": 0.05,
        }

    mid = {"results": [result("reach-glasses-with", 5.0, 0.8), result("reach-glasses-with", 2.5, 0.5)]}
    up0 = {"results": [result("reach-glasses-with", 5.0, 0.95), result("reach-hair-red", 20.0, 0.6)]}
    table = render.reach_comparison_markdown([("mid", mid), ("up0", up0)])
    lines = table.splitlines()
    assert "| Class | Strength | mid | up0 |" in lines
    assert (
        "| glasses: with | 5 | 80.0% (30.0%); valid 90.0%, ent. 5.0 | 95.0% (30.0%); valid 90.0%, ent. 5.0 |" in lines
    )
    assert "| hair: red | 20 |  | 60.0% (30.0%); valid 90.0%, ent. 5.0 |" in lines
    assert "| glasses: with | 2.5 | 50.0% (30.0%); valid 90.0%, ent. 5.0 |  |" in lines  # up0 did not run 2.5
    assert lines.index("| glasses: with | 2.5 | 50.0% (30.0%); valid 90.0%, ent. 5.0 |  |") < lines.index(
        "| hair: red | 20 |  | 60.0% (30.0%); valid 90.0%, ent. 5.0 |"
    )
