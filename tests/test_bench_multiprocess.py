"""lab/bench_multiprocess.py: its collective timing runs (2 gloo processes, a few calls) and its table is
generated from its JSON; never its timings."""

import json

from lab import bench_multiprocess as bench


def test_collective_timing_covers_every_case(tmp_path):
    rows = bench.bench_collective(7, tmp_path)
    assert len(rows) == 1 + len(bench.COLLECTIVE_CLASSES) * len(bench.COLLECTIVE_ROWS)
    assert rows[0]["case"].startswith("size gather") and all(r["median_us"] > 0 for r in rows)
    assert [r["width"] for r in rows[1:]] == [2 * k for k in bench.COLLECTIVE_CLASSES for _ in bench.COLLECTIVE_ROWS]
    assert all(r["calls"] == 7 for r in rows)  # spread over the rounds, every call counted once


def test_collective_rounds_alternate_the_order_of_the_cases():
    assert bench.collective_order(3, 3) == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_generate_setups_are_warmed_up_then_alternate(tmp_path, monkeypatch):
    """`bench_generate` runs every setup once untimed (1 step) first, then the timed runs in alternating order."""
    calls = []

    def fake_run(label, processes, threads, args, out, workdir, steps=None):
        calls.append((label, steps))
        return {"wall_s": 2.0, "vanilla": 1.0, "balanced": 1.0}

    monkeypatch.setattr(bench, "_run_generate", fake_run)
    args = bench.build_parser().parse_args(["--num-images", "8", "--batch-size", "4", "--repeats", "3"])
    rows, order = bench.bench_generate(args, tmp_path)
    labels = [label for label, _, _ in bench.GENERATE_SETUPS]
    assert calls[: len(labels)] == [(label, 1) for label in labels]
    timed = [label for label, steps in calls[len(labels) :] if steps is None]
    assert order == [labels, labels[::-1], labels] and timed == labels + labels[::-1] + labels
    assert [len(row["runs"]) for row in rows] == [3] * len(labels)
    assert rows[0]["images_per_s"] == {"vanilla": 8.0, "balanced": 8.0}


def test_generate_times_both_sets_warm(tmp_path, monkeypatch):
    """The `generate` command's own timing (what this benchmark reads): both sets get an untimed 1-step call first,
    in the reverse of the timed order."""
    from tiny_models import tiny_classifier, tiny_sd_pipeline

    import h_classifiers.evaluation
    from h_classifiers.commands import generate as generate_command

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    classifier = tiny_classifier(scale=0.05)
    heads, classes = classifier.weight.shape[:2]
    classifier.set_calibration([1.0] * heads, [[0.0] * classes] * heads)
    classifier.save_pretrained(tmp_path / "skin")
    calls = []
    real = h_classifiers.evaluation.run_configuration  # generate imports it when it runs

    def recording(pipe, classifier, spec, configuration, **options):
        calls.append((configuration, spec.num_images, spec.num_inference_steps))
        return real(pipe, classifier, spec, configuration, **options)

    monkeypatch.setattr(h_classifiers.evaluation, "run_configuration", recording)
    argv = ["--model", str(tmp_path / "sd"), "--classifier", str(tmp_path / "skin"), "--threads", "1"]
    argv += ["--num-images", "5", "--batch-size", "2", "--steps", "3", "--output-dir", str(tmp_path / "out")]
    report = generate_command.main(argv)
    assert calls == [("distribution", 2, 1), ("vanilla", 2, 1), ("vanilla", 5, 3), ("distribution", 5, 3)]
    assert set(report["results"]) == {"vanilla", "balanced"}


def test_markdown_is_generated_from_the_json(tmp_path):
    results = {
        "started_utc": "2026-01-01T00:00:00Z",
        "total_wall_s": 10.0,
        "load_average_end": [1.0, 1.0, 1.0],
        "machine": {
            "cpu_model": "cpu",
            "usable_cpus": 2,
            "torch": "t",
            "accelerate": "a",
            "load_average_start": [1.0],
        },
        "config": {
            "num_images": 8,
            "batch_size": 4,
            "steps": 3,
            "repeats": 2,
            "iterations": 5,
            "collective_warmup": 10,
            "collective_rounds": 5,
        },
        "generate_order": [["2 processes x 1 thread"], ["2 processes x 1 thread"]],
        "generate": [
            {
                "setup": "2 processes x 1 thread",
                "batch_size_per_process": 2,
                "runs": [
                    {"vanilla": 1.0, "balanced": 2.0, "wall_s": 5.0},
                    {"vanilla": 4.0, "balanced": 2.0, "wall_s": 7},
                ],
                "median_s": {"vanilla": 2.5, "balanced": 2.0, "wall_s": 6.0},
                "images_per_s": {"vanilla": 3.2, "balanced": 4.0},
            }
        ],
        "collective": [
            {"case": "logits, 2 classes", "rows_per_process": 4, "width": 4, "median_us": 500, "p90_us": 900}
        ],
        "unet_step_reference": {
            "source": "docs/lab/bench/bench.json",
            "device": "cpu",
            "scales": {"toy": {"s_per_step": 0.05, "unet_rows": 8}},
        },
    }
    (tmp_path / "multiprocess.json").write_text(json.dumps(results))
    bench.main(["--markdown-only", "--output-dir", str(tmp_path)])
    table = (tmp_path / "multiprocess.md").read_text()
    assert "| 2 processes x 1 thread | 2 | 3.2 (8.0, 2.0) | 4.0 (4.0, 4.0) | 6.0 |" in table
    assert "| logits, 2 classes | 4 | [4, 4] | 500 | 900 |" in table
    assert "| toy, cpu, 8 UNet rows | 0.050 | 1.0e-02 |" in table
    assert "after one warm-up run (1 step) of every setup" in table
    assert "median of 5 calls per case after 10 warm-up calls, in 5 rounds alternating the order" in table
