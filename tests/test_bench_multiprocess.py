"""benchmarks/bench_multiprocess.py: its collective timing runs (2 gloo processes, a few calls) and its table is
generated from its JSON; never its timings."""

import json

from benchmarks import bench_multiprocess as bench


def test_collective_timing_covers_every_case(tmp_path):
    rows = bench.bench_collective(2, tmp_path)
    assert len(rows) == 1 + len(bench.COLLECTIVE_CLASSES) * len(bench.COLLECTIVE_ROWS)
    assert rows[0]["case"].startswith("size gather") and all(r["median_us"] > 0 for r in rows)
    assert [r["width"] for r in rows[1:]] == [2 * k for k in bench.COLLECTIVE_CLASSES for _ in bench.COLLECTIVE_ROWS]


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
        "config": {"num_images": 8, "batch_size": 4, "steps": 3, "repeats": 2, "iterations": 5},
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
            "source": "docs/bench/bench.json",
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
