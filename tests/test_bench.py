"""The benchmark harness (`python benchmarks/bench.py --quick`) on tiny in-process models: structure and arithmetic of its
output, never its timings."""

import json
import statistics

import pytest
import torch
from tiny_models import tiny_classifier, tiny_sd_pipeline

from benchmarks import bench


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny Stable Diffusion directory standing in for the toy model, and a classifier that fits it."""
    root = tmp_path_factory.mktemp("bench-assets")
    tiny_sd_pipeline().save_pretrained(root / "toy-sd")
    tiny_classifier().save_pretrained(root / "skin")
    return root


@pytest.fixture(scope="module")
def quick_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    argv = [
        "--quick",
        "--threads",
        "1",
        "--memory",
        "inprocess",
        "--toy-model",
        str(tiny_assets / "toy-sd"),
        "--toy-classifier",
        str(tiny_assets / "skin"),
        "--output-dir",
        str(out),
    ]
    returned = bench.main(argv)
    return out, returned


def test_outputs_written_and_match(quick_run):
    out, returned = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["targets"] == returned["targets"]
    table = (out / "table.md").read_text()
    assert data["machine"]["cpu_model"] in table
    assert data["machine"]["torch_threads"] == 1
    assert set(data) >= {"machine", "config", "generation", "extraction", "training", "targets", "total_wall_s"}
    assert not list(out.glob(".tmp-*"))


def test_generation_ratios_come_from_the_measurements(quick_run):
    data = quick_run[1]
    assert set(data["generation"]) == {"toy", "sd15"}
    toy = data["generation"]["toy"]
    assert toy["classifier"]["source"] == "shipped"
    assert data["generation"]["sd15"]["h_shape"] == [64, 2, 2]
    for scale in data["generation"].values():
        rounds = scale["rounds"]
        assert scale["order"][0] == list(bench.ARMS) and scale["order"][1] == list(reversed(bench.ARMS))
        vanilla = scale["arms"]["vanilla"]
        for arm in bench.ARMS:
            values = scale["arms"][arm]
            assert len(values["wall_s"]) == rounds
            assert values["median_s"] == statistics.median(values["wall_s"])
            assert values["s_per_step"] == pytest.approx(values["median_s"] / scale["steps"])
            memory = values["memory"]
            assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
            assert memory["increment_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]
        for arm in bench.GUIDED_ARMS:
            values, ratios = scale["arms"][arm], scale["ratios"][arm]
            assert ratios["wall"] == pytest.approx(values["median_s"] / vanilla["median_s"])
            assert ratios["peak_memory"] == pytest.approx(
                values["memory"]["peak_bytes"] / vanilla["memory"]["peak_bytes"]
            )
            step = values["guidance_step"]
            assert step["available"], step
            assert step["rows"] == 2 * scale["num_images"]
            assert ratios["wall_from_guidance_step"] == pytest.approx(
                1 + step["ms_median"] / 1000 / vanilla["s_per_step"]
            )


def test_extraction_and_training_figures(quick_run):
    data = quick_run[1]
    extraction = data["extraction"]
    n = extraction["num_images"]
    for values in extraction["batches"].values():
        assert values["images_per_s"] == pytest.approx(n / values["median_s"])
    large, small = extraction["speedup_of"]
    assert extraction["speedup"] == pytest.approx(
        extraction["batches"][str(large)]["images_per_s"] / extraction["batches"][str(small)]["images_per_s"]
    )
    # fp32 shards hold twice the h bytes of fp16 ones, plus the same small labels/index/header bytes.
    per_image, h_bytes = extraction["bytes_per_image"], extraction["h_bytes_per_image"]
    assert h_bytes["fp32"] == 2 * h_bytes["fp16"] == 2 * 2 * 64 * 4 * 4 * extraction["steps"]
    assert per_image["fp16"] >= h_bytes["fp16"] and per_image["fp32"] >= h_bytes["fp32"]
    assert per_image["fp32"] - per_image["fp16"] == pytest.approx(h_bytes["fp16"], rel=0.01)

    training = data["training"]
    dim = 64 * 2 * 2
    assert training["slice_bytes"] == training["num_samples"] * dim * 2
    assert training["feature_set_bytes_nominal"] == training["slice_bytes"] * training["timesteps_nominal"]
    assert training["feature_set_bytes_written"] >= training["slice_bytes"] * training["timesteps_trained"]
    memory = training["memory"]
    assert memory["measured_in"] == "fresh worker process"
    assert memory["increment_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]
    assert training["increment_over_slice_plus_model"] == pytest.approx(
        memory["increment_bytes"] / (training["slice_bytes"] + training["model_bytes"])
    )
    assert len(training["heldout_accuracy"]) == training["timesteps_trained"]


def test_targets_use_the_measured_ratios(quick_run):
    data = quick_run[1]
    targets = {t["name"]: t for t in data["targets"]}
    sd15 = data["generation"]["sd15"]["ratios"]["distribution"]
    wall = targets["generation sd15 distribution: guided/vanilla wall"]
    assert wall["value"] == sd15["wall"] and wall["met"] == (sd15["wall"] <= bench.TARGET_WALL_RATIO)
    speedup = targets[f"extraction: images/s at batch {data['extraction']['speedup_of'][0]} / batch 1"]
    assert speedup["value"] == data["extraction"]["speedup"]
    assert speedup["met"] == (speedup["value"] >= bench.TARGET_EXTRACTION_SPEEDUP)


def test_memory_worker_runs_in_a_fresh_process(tiny_assets):
    """The per-arm CPU memory measurement spawns a worker that rebuilds the scale and reports its own peak."""
    config = bench.resolve_config(
        bench.build_parser().parse_args(["--quick", "--threads", "1", "--toy-model", str(tiny_assets / "toy-sd")])
    )
    result = bench.run_worker({"kind": "generation", "scale": "toy", "arm": "distribution"}, config)
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["wall_s"] > 0


def test_missing_toy_model_is_reported_not_fatal(tmp_path):
    data = bench.main(
        [
            "--quick",
            "--threads",
            "1",
            "--parts",
            "generation",
            "--scales",
            "toy",
            "--toy-model",
            str(tmp_path / "absent"),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert str(tmp_path / "absent") in data["generation"]["toy"]["skipped"]
    assert "skipped" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parts", "generation,bogus"], "--parts"),
        (["--scales", "sd21"], "--scales"),
        (["--threads", "0"], "positive integer"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_bad_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_bad_device_is_refused():
    with pytest.raises(SystemExit, match="--device"):
        bench.main(["--device", "tpu", "--parts", "training"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench.main(["--device", "cuda", "--parts", "training"])


def test_alternating_order_reverses_every_other_round():
    assert bench.alternating_order(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
