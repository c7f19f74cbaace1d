"""The benchmark harness (`python -m lab.bench --quick`) on tiny in-process models: structure and arithmetic of its
output, never its timings."""

import json
import statistics

import pytest
import torch
from tiny_models import tiny_classifier, tiny_sd_pipeline

from lab import ROOT
from lab.bench import arms, cli, config, generation, measuring, targets


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny Stable Diffusion directory standing in for the toy model, and a classifier that fits it, with a
    calibration and anchors as `train` makes them."""
    root = tmp_path_factory.mktemp("bench-assets")
    tiny_sd_pipeline().save_pretrained(root / "toy-sd")
    classifier = tiny_classifier()
    heads, classes = classifier.weight.shape[:2]
    classifier.set_calibration([1.0] * heads, [[0.0] * classes] * heads)
    classifier.save_pretrained(root / "skin")
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
        "--scales",
        "toy,sd15,celebahq",
        "--toy-model",
        str(tiny_assets / "toy-sd"),
        "--toy-classifier",
        str(tiny_assets / "skin"),
        "--output-dir",
        str(out),
    ]
    returned = cli.main(argv)
    return out, returned


def test_outputs_written_and_match(quick_run):
    out, returned = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["targets"] == returned["targets"]
    table = (out / "table.md").read_text()
    assert data["machine"]["cpu_model"] in table
    assert data["machine"]["torch_threads"] == 1
    assert data["config"]["output_dir"] == f".../{out.name}" and str(out) not in (out / "bench.json").read_text()
    assert set(data) >= {"machine", "config", "generation", "extraction", "training", "targets", "total_wall_s"}
    assert not list(out.glob(".tmp-*"))


def test_generation_ratios_come_from_the_measurements(quick_run):
    data = quick_run[1]
    assert set(data["generation"]) == {"toy", "sd15", "celebahq"}
    toy = data["generation"]["toy"]
    assert toy["classifier"]["source"] == "shipped"
    assert data["generation"]["sd15"]["h_shape"] == [64, 2, 2]
    # google/ddpm-celebahq-256's blocks at --quick width (unconditional, no CFG): distribution mode only.
    celebahq = data["generation"]["celebahq"]
    assert celebahq["h_shape"] == [64, 2, 2] and celebahq["unet_rows"] == celebahq["num_images"] == 2
    assert celebahq["arm_names"] == ["vanilla", "distribution"] and set(celebahq["ratios"]) == {"distribution"}
    for name, scale in data["generation"].items():
        rounds, names = scale["rounds"], scale["arm_names"]
        assert names == (["vanilla", "distribution"] if name == "celebahq" else list(config.ARMS))
        # Every arm is warmed up before the timed rounds, which alternate the order of the arms.
        assert scale["warmup_rounds"] >= 1 and scale["warmup_order"][0] == names
        assert scale["order"] == measuring.alternating_order(names, rounds)
        assert scale["order"][0] == names and scale["order"][1] == list(reversed(names))
        # The default path: a classifier with a calibration and anchors.
        assert scale["classifier"]["calibrated"] and scale["classifier"]["anchor_source"] is not None
        vanilla = scale["arms"]["vanilla"]
        assert isinstance(vanilla["host_syncs_per_call"]["counter"], int)
        assert vanilla["host_syncs_per_call"]["cuda_sync_debug"] is None  # counted by torch on CUDA only
        assert set(scale["arms"]) == set(names)
        for arm in names:
            values = scale["arms"][arm]
            assert len(values["wall_s"]) == rounds
            assert values["median_s"] == statistics.median(values["wall_s"])
            assert values["s_per_step"] == pytest.approx(values["median_s"] / scale["steps"])
            assert values["s_per_image"] == pytest.approx(values["median_s"] / scale["num_images"])
            memory = values["memory"]
            assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
            assert memory["increment_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]
        for arm in names[1:]:
            values, ratios = scale["arms"][arm], scale["ratios"][arm]
            assert ratios["wall"] == pytest.approx(values["median_s"] / vanilla["median_s"])
            assert ratios["peak_memory"] == pytest.approx(
                values["memory"]["peak_bytes"] / vanilla["memory"]["peak_bytes"]
            )
            # The guidance step, timed at every UNet call of the timed rounds (one call per step, with or without CFG).
            step, vanilla_step = values["guidance_step"], vanilla["guidance_step"]
            assert step["available"] and vanilla_step["available"], (step, vanilla_step)
            cfg_rows = 2 if scale["guidance_scale"] > 1 else 1
            assert step["rows"] == scale["unet_rows"] == cfg_rows * scale["num_images"]
            assert step["calls"] == rounds * scale["steps"]
            assert ratios["wall_from_guidance_step"] == pytest.approx(
                1 + (step["ms_median"] - vanilla_step["ms_median"]) / 1000 / vanilla["s_per_step"]
            )
            added = values["host_syncs_per_call"]["counter"] - vanilla["host_syncs_per_call"]["counter"]
            assert scale["guided_steps_per_call"] == scale["steps"]
            assert ratios["syncs_per_guided_step"]["counter"] == pytest.approx(added / scale["steps"])


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
    by_name = {t["name"]: t for t in data["targets"]}
    # On CPU only the SD1.5 wall ratio has a target; --quick runs 2 rounds: reported, not judged.
    sd15 = data["generation"]["sd15"]["ratios"]["distribution"]
    wall = by_name["generation sd15 distribution: guided/vanilla wall"]
    assert wall["value"] == sd15["wall"] and wall["limit"] == f"<= {config.TARGET_CPU_SD15_WALL_RATIO}"
    assert wall["met"] is None and wall["verdict"] == f"not judged (2 rounds < {config.MIN_TIMED_ROUNDS})"
    assert not any(name.startswith("generation toy") for name in by_name)
    speedup = by_name[f"extraction: images/s at batch {data['extraction']['speedup_of'][0]} / batch 1"]
    assert speedup["value"] == data["extraction"]["speedup"] and speedup["met"] is None
    assert not any(t["met"] for t in data["targets"])
    table = (quick_run[0] / "table.md").read_text()
    assert f"| not judged (2 rounds < {config.MIN_TIMED_ROUNDS}) |" in table
    assert "| yes |" not in table


def _generation_results(device: str, rounds: int, wall: float, batch: int = 8, dtype: str = "float16") -> dict:
    scale = {"rounds": rounds, "num_images": batch, "guidance_scale": 7.5, "dtype": dtype}
    scale["ratios"] = {"distribution": {"wall": wall, "peak_memory": 1.0}}
    return {"config": {"device": device, "quick": False}, "generation": {"sd15": scale}}


@pytest.mark.parametrize("rounds", [1, 4])
def test_a_target_from_fewer_than_five_rounds_is_not_met(rounds):
    (wall, _) = targets.evaluate_targets(_generation_results("cuda", rounds, wall=0.5))
    assert wall["met"] is None and not wall["judged"]
    assert wall["verdict"] == f"not judged ({rounds} rounds < 5)"


def test_targets_are_judged_from_five_rounds():
    wall, memory = targets.evaluate_targets(_generation_results("cuda", 5, wall=1.01))
    assert wall["name"] == "generation sd15 distribution: guided/vanilla wall"
    assert (wall["met"], wall["verdict"], wall["limit"]) == (True, "yes", f"<= {config.TARGET_GPU_SD15_WALL_RATIO}")
    assert memory["name"].endswith("peak memory") and memory["met"] is True
    (cpu_wall,) = targets.evaluate_targets(_generation_results("cpu", 7, wall=1.04))
    assert (cpu_wall["met"], cpu_wall["verdict"]) == (False, "no")


def test_gpu_sd15_target_needs_its_batch_and_dtype():
    (wall, _) = targets.evaluate_targets(_generation_results("cuda", 5, wall=1.0, batch=4))
    assert wall["met"] is None and wall["verdict"].startswith("not judged (batch 4 + CFG, float16")
    (wall, _) = targets.evaluate_targets(_generation_results("cuda", 5, wall=1.0, dtype="float32"))
    assert wall["met"] is None


def test_random_classifier_is_made_as_train_makes_one():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**config.SD15_SCHEDULER_CONFIG)
    classifier = arms.random_classifier([8, 2, 2], scheduler, 0, "attribute", ["a", "b", "c"])
    assert classifier.config.anchor_source == "class_means_spread" and classifier.has_anchors
    assert classifier.config.calibration_scale is not None and classifier.config.calibration_bias is not None
    assert classifier.anchors.shape == classifier.weight.shape == (50, 3, 32)
    assert torch.isfinite(classifier.anchors).all() and classifier.anchors.abs().sum() > 0
    described = arms.classifier_description(classifier)
    assert described == {"calibrated": True, "anchor_source": "class_means_spread", "num_heads": 50}


def test_memory_worker_runs_in_a_fresh_process(tiny_assets):
    """The per-arm CPU memory measurement spawns a worker that rebuilds the scale and reports its own peak."""
    run = cli.resolve_config(
        cli.build_parser().parse_args(["--quick", "--threads", "1", "--toy-model", str(tiny_assets / "toy-sd")])
    )
    result = measuring.run_worker({"kind": "generation", "scale": "toy", "arm": "distribution"}, run)
    assert result["peak_bytes"] >= result["baseline_bytes"] > 0
    assert result["wall_s"] > 0


def test_missing_toy_model_is_reported_not_fatal(tmp_path):
    data = cli.main(
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
    assert "toy model not found at .../absent" in data["generation"]["toy"]["skipped"]
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
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_timing_without_warm_up_is_refused():
    with pytest.raises(SystemExit, match="--sd15-warmup must be >= 1"):
        cli.main(["--sd15-warmup", "0", "--parts", "generation"])


def test_bad_device_is_refused():
    with pytest.raises(SystemExit, match="--device"):
        cli.main(["--device", "tpu", "--parts", "training"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["--device", "cuda", "--parts", "training"])


def test_distribution_mode_at_one_image_per_call_carries_a_balance_state():
    """The pipeline needs 2 images per distribution-mode call, or a BalanceState: at batch 1 (the CPU default at SD1.5
    shapes) every call of the arm gets the same state, as a job generated one image at a time."""
    from pipeline_balancing_act import BalanceState

    def scale(num_images):
        return arms.GenerationScale("sd15", None, None, "classifier", {}, {}, num_images, 1, 7.5, [4, 2, 2], [])

    one = scale(1)
    first, second = arms.guidance_kwargs(one, "distribution"), arms.guidance_kwargs(one, "distribution")
    assert isinstance(first["balance_state"], BalanceState) and first["balance_state"] is second["balance_state"]
    assert "balance_state" not in arms.guidance_kwargs(one, "sample") and "BalanceState" in one.notes[-1]
    assert "balance_state" not in arms.guidance_kwargs(scale(2), "distribution")


def test_written_paths_name_no_machine_path(tmp_path):
    """bench.json under docs/lab/ must not hold an absolute path of the machine that wrote it."""
    assert config.written_path(ROOT / "docs" / "lab" / "bench") == "docs/lab/bench"
    assert config.written_path(tmp_path / "out") == ".../out"
    run = cli.resolve_config(cli.build_parser().parse_args(["--parts", "training"]))
    written = config.written_config(run)
    assert written["output_dir"] == "docs/lab/bench" and not written["toy_model"].startswith("/")


def test_celebahq_scale_is_measured_only_when_asked_for():
    parse = cli.build_parser().parse_args
    assert cli.resolve_config(parse([])).scales == ["toy", "sd15"]
    run = cli.resolve_config(parse(["--scales", "celebahq", "--celebahq-steps", "3", "--celebahq-rounds", "5"]))
    assert run.scales == ["celebahq"] and (run.celebahq_steps, run.celebahq_rounds) == (3, 5)
    assert generation.memory_mode(run, "celebahq") == "inprocess"  # a fresh worker would cost a long UNet call


def test_alternating_order_reverses_every_other_round():
    assert measuring.alternating_order(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
