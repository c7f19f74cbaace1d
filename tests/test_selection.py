"""The selection baseline: vanilla images read by a labeller and kept while their class has room, until the target
counts are filled (`h_classifiers.selection`), as a configuration of `evaluate` and of the reproduction table.

The bookkeeping runs on hand-made label sequences and a recording fake pipeline (image i's red value is its seed);
the tiny real pipelines check that its first images are exactly vanilla's."""

import json
import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image
from tiny_models import tiny_classifier
from unconditional_models import UNCONDITIONAL_H_SHAPE, tiny_scheduler, tiny_unconditional_pipeline, tiny_unet

from h_classifiers import distributed, labellers, preflight
from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.evaluation import EvaluationSpec, evaluate, run_configuration
from h_classifiers.labellers import Labeller
from h_classifiers.metrics import class_counts
from h_classifiers.selection import Selector, check_max_images, generate_selection, selection_rounds
from h_classifiers.toy_world import TOY_MODEL_PATH
from lab.reproduce import jobs, measures, pool, render, rows


class RecordingPipe:
    """One 4x4 image per prompt whose red value is its generator's seed (mod 256); records every call's seeds."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, output_type, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"prompt": list(prompt), "seeds": seeds, **kwargs})
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds])


def red(image):
    return image.getpixel((0, 0))[0]


def parity_labeller(images):
    """Class = seed mod 2; seeds divisible by 5 are unlabelled (-1)."""
    reds = torch.tensor([red(image) for image in images])
    return torch.where(reds % 5 == 0, -1, reds % 2)


def make_spec(**kwargs):
    defaults = {"prompt": "a face", "target": [0.3, 0.7], "num_images": 10, "batch_size": 4, "seed": 0}
    return EvaluationSpec(**{"num_inference_steps": 2, "guidance_scale": 2.0, **defaults, **kwargs})


# Seeds 0.. under `parity_labeller`: class 0 = 2, 4, 6 (3 of them asked), class 1 = 1, 3, 7, 9, 11, 13, 17 (7 asked);
# 0, 5, 10, 15 are unlabelled. The counts fill at seed 17, in the round [14, 18) of 4 images.
KEPT_SEEDS = [1, 2, 3, 4, 6, 7, 9, 11, 13, 17]


# ---------------------------------------------------------------------------------------------------------------
# The bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def test_the_selector_keeps_while_a_class_has_room_and_reports_the_cost_per_image_kept():
    selector = Selector([2, 1])
    assert selector.offer([0, -1, 0]) == [0, 2]
    assert selector.offer([0, 1, 1]) == [4]  # class 0 is full; the second 1 comes after the counts are filled
    assert selector.filled and selector.kept == [0, 2, 4]
    report = selector.report()
    assert report["images_generated"] == 6 and report["images_kept"] == 3
    assert report["images_generated_per_kept"] == 2.0
    assert report["filled"] and report["shortfall"] == [0, 0] and report["kept_counts"] == [2, 1]
    assert report["generated_valid_rate"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="Label 2 of image 6 is out of range for 2 classes"):
        selector.offer([2])


def test_nothing_kept_gives_no_ratio():
    selector = Selector([1, 1])
    selector.offer([-1, -1])
    report = selector.report()
    assert report["images_kept"] == 0 and report["images_generated_per_kept"] is None and not report["filled"]


def test_rounds_start_with_vanillas_batches_and_stop_at_the_cap():
    rounds = list(selection_rounds(5, 2, 9))
    assert rounds[:3] == [range(0, 2), range(2, 3), range(3, 5)]  # generation.batch_ranges(5, 2)
    assert rounds[3:] == [range(5, 7), range(7, 9)]


def test_the_cap_must_cover_the_images_kept():
    assert check_max_images(None, 7) == 140
    with pytest.raises(ValueError, match=r"`--selection-max-images` must be an integer >= the number of images kept"):
        check_max_images(6, 7, "--selection-max-images")


# ---------------------------------------------------------------------------------------------------------------
# As a configuration of evaluate
# ---------------------------------------------------------------------------------------------------------------


def test_selection_keeps_the_target_counts_skips_unlabelled_images_and_starts_with_vanillas_calls():
    vanilla_pipe, pipe = RecordingPipe(), RecordingPipe()
    spec = make_spec()
    vanilla = run_configuration(vanilla_pipe, None, spec, "vanilla")
    progress = []
    generation = run_configuration(pipe, None, spec, "selection", progress.append, labeller=parity_labeller)
    assert [red(image) for image in generation.images] == KEPT_SEEDS
    assert sum(progress) == 10  # evaluate's bar counts the images kept
    assert generation.labels.tolist() == [s % 2 for s in KEPT_SEEDS]
    assert torch.bincount(generation.labels).tolist() == class_counts([0.3, 0.7], 10) == [3, 7]
    # Its first calls are vanilla's (same seeds, same batches), then batches of 4 until the counts are filled.
    assert pipe.calls[: len(vanilla_pipe.calls)] == vanilla_pipe.calls
    assert [call["seeds"] for call in pipe.calls[len(vanilla_pipe.calls) :]] == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert all("guidance_mode" not in call for call in pipe.calls)
    kept_vanilla = [red(image) for image in vanilla.images if red(image) in KEPT_SEEDS]
    assert kept_vanilla == KEPT_SEEDS[:7]  # every labelled vanilla image but 8 (class 0 was full)
    report = generation.selection
    assert report["images_generated"] == 18 and report["images_generated_per_kept"] == pytest.approx(1.8)
    assert report["filled"] and report["target_counts"] == [3, 7] and report["max_images"] == 200


def test_the_cap_stops_and_reports_the_shortfall():
    spec = make_spec(target=[0.5, 0.5], num_images=6, selection_max_images=15)
    generation = run_configuration(
        RecordingPipe(), None, spec, "selection", labeller=lambda images: torch.zeros(len(images))
    )
    report = generation.selection
    assert report["images_generated"] == 15 and not report["filled"]
    assert report["kept_counts"] == [3, 0] and report["shortfall"] == [0, 3]
    assert report["images_generated_per_kept"] == 5.0 and len(generation.images) == 3


class FlaggingPipe(RecordingPipe):
    """A pipeline whose safety checker blacks out every image with an even seed (all of class 0)."""

    def __call__(self, prompt, generator, output_type, **kwargs):
        output = super().__call__(prompt, generator, output_type, **kwargs)
        output.nsfw_content_detected = [g.initial_seed() % 2 == 0 for g in generator]
        return output


def test_images_the_safety_checker_blacked_out_are_never_kept():
    spec = make_spec(target=[0.5, 0.5], num_images=4, seed=1, selection_max_images=12)
    generation = run_configuration(FlaggingPipe(), None, spec, "selection", labeller=parity_labeller)
    report = generation.selection
    assert [red(image) for image in generation.images] == [1, 3]  # seeds 1..12: 5 is unlabelled, 7, 9, 11 surplus
    assert report["generated_blacked_out"] == 6 and report["shortfall"] == [2, 0] and not report["filled"]


def test_evaluate_measures_the_kept_images_and_reports_the_cost(tmp_path):
    configurations = ["vanilla", "selection"]
    report = evaluate(RecordingPipe(), None, make_spec(), parity_labeller, configurations, tmp_path, ["light", "dark"])
    summary = report["results"]["selection"]
    assert summary["counts"] == [3, 7] and summary["fd"] == 0.0 and summary["valid_rate"] == 1.0
    assert summary["images_generated"] == 18 and summary["images_generated_per_kept"] == pytest.approx(1.8)
    assert report["results"]["vanilla"]["num_images"] == 10 and "images_generated" not in report["results"]["vanilla"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["selection"]["filled"] is True and (tmp_path / "grid_selection.png").exists()


def test_selection_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="pass a `labeller`"):
        run_configuration(RecordingPipe(), None, make_spec(), "selection")
    with pytest.raises(ValueError, match=r"takes only `state` of the generation options, got \['skip'\]"):
        run_configuration(RecordingPipe(), None, make_spec(), "selection", labeller=parity_labeller, skip=bool)


class ThreadState:
    """Process `process_index` of `num_processes` (accelerate's own split), the processes being threads."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device = torch.device("cpu")


def test_several_processes_keep_the_images_one_process_keeps(monkeypatch):
    """Two processes (threads, gathering through a barrier) each label their share of a round and take the same
    decisions as one process."""
    barrier, slots = threading.Barrier(2, timeout=60), [None, None]  # a broken run fails, never hangs

    def gather_objects(objects, state):
        if state is None:  # the one-process reference run
            return list(objects)
        slots[state.process_index] = list(objects)
        barrier.wait()
        gathered = [item for slot in slots for item in slot]
        barrier.wait()
        return gathered

    monkeypatch.setattr(distributed, "gather_objects", gather_objects)
    results, pipes = [None, None], [RecordingPipe(), RecordingPipe()]

    def process(index):
        results[index] = generate_selection(
            pipes[index], "a face", [0.3, 0.7], 10, parity_labeller, 0, 2, state=ThreadState(index, 2)
        )

    threads = [threading.Thread(target=process, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result is not None for result in results)
    single = generate_selection(RecordingPipe(), "a face", [0.3, 0.7], 10, parity_labeller, 0, 4)
    for result in results:
        assert [red(image) for image in result.images] == KEPT_SEEDS
        assert result.report["images_generated"] == single.report["images_generated"] == 18
    # Each process generated its own share: together every seed once.
    seeds = sorted(s for pipe in pipes for call in pipe.calls for s in call["seeds"])
    assert seeds == list(range(18))


# ---------------------------------------------------------------------------------------------------------------
# On the tiny real pipelines: the first images are exactly vanilla's
# ---------------------------------------------------------------------------------------------------------------


class SequenceLabeller:
    """Labels the images it is given with the next values of a fixed sequence (whatever the images)."""

    def __init__(self, labels):
        self.labels, self.seen = list(labels), 0

    def __call__(self, images):
        labels = self.labels[self.seen : self.seen + len(images)]
        assert len(labels) == len(images), "the test's label sequence is too short"
        self.seen += len(images)
        return torch.tensor(labels)


def as_array(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_the_first_images_are_exactly_vanillas_on_a_text_to_image_pipeline(ba_pipe):
    spec = make_spec(target=[1.0, 0.0], num_images=4, batch_size=2, seed=11)
    vanilla = run_configuration(ba_pipe, None, spec, "vanilla")
    labeller = SequenceLabeller([0, -1, 0, 0, 0, 0])  # image 1 unlabelled: images 0, 2, 3 and then 4 are kept
    selection = run_configuration(ba_pipe, None, spec, "selection", labeller=labeller)
    kept, reference = as_array(selection.images), as_array(vanilla.images)
    assert np.array_equal(kept[:3], reference[[0, 2, 3]])
    assert selection.selection["images_generated"] == 6  # vanilla's 4, then one more batch of 2


def test_the_first_images_are_exactly_vanillas_on_an_unconditional_pipeline():
    pipe = tiny_unconditional_pipeline()
    spec = make_spec(prompt=None, target=[0.5, 0.5], num_images=3, batch_size=2, seed=4, eta=0.0)
    vanilla = run_configuration(pipe, None, spec, "vanilla")
    selection = run_configuration(pipe, None, spec, "selection", labeller=SequenceLabeller([0, 1, 1, 0, 0]))
    assert np.array_equal(as_array(selection.images)[:2], as_array(vanilla.images)[:2])
    assert selection.selection["images_generated"] == 5 and selection.selection["kept_counts"] == [2, 1]


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------


class CyclingLabeller(Labeller):
    """Labels light, dark, unlabelled, light, dark, unlabelled, ... in the order it sees images."""

    class_names = ["light", "dark"]
    attribute = "skin"
    source = "test.CyclingLabeller"

    def __init__(self):
        self.seen = 0

    def label(self, images):
        labels = [(0, 1, -1)[(self.seen + i) % 3] for i in range(len(images))]
        self.seen += len(images)
        return torch.tensor(labels)


@pytest.fixture
def cycling_labeller(monkeypatch):
    real = labellers.labeller_from_spec
    monkeypatch.setattr(
        labellers,
        "labeller_from_spec",
        lambda spec, **kwargs: CyclingLabeller() if spec == "test:cycle" else real(spec, **kwargs),
    )
    monkeypatch.setattr(preflight, "LABELLER_KINDS", (*preflight.LABELLER_KINDS, "test"))  # the early check's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny unconditional model saved as a DDIMPipeline and a skin classifier of its h shape."""
    from diffusers import DDIMPipeline

    root = tmp_path_factory.mktemp("selection-models")
    DDIMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(root / "ddim")
    tiny_classifier(h_shape=UNCONDITIONAL_H_SHAPE).save_pretrained(root / "skin")
    return root


def selection_argv(tmp_path, *extra):
    argv = ["--configurations", "selection", "--num-images", "4", "--batch-size", "2", "--steps", "2"]
    return argv + [
        "--labeller",
        "test:cycle",
        "--threads",
        "1",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
        *extra,
    ]


def check_cli_report(report):
    summary = report["results"]["selection"]
    # light, dark, -, light, dark, -: counts [2, 2] filled at image 5 (vanilla's 4, then a batch of 2)
    assert list(report["results"]) == ["selection"] and summary["counts"] == [2, 2] and summary["filled"]
    assert summary["images_generated"] == 6 and summary["images_generated_per_kept"] == 1.5
    assert report["spec"]["selection_max_images"] is None


@pytest.mark.skipif(not (TOY_MODEL_PATH / "model_index.json").exists(), reason="the committed toy model is missing")
def test_the_cli_runs_selection_on_a_text_to_image_model(cycling_labeller, tmp_path, capsys):
    report = evaluate_command.main(selection_argv(tmp_path))
    check_cli_report(report)
    assert report["spec"]["prompt"] == "a photo of a face"
    assert "kept 4 of 6 generated (1.50 per kept)" in capsys.readouterr().out


def test_the_cli_runs_selection_on_an_unconditional_model(models, cycling_labeller, tmp_path):
    argv = ["--model", str(models / "ddim"), "--classifier", str(models / "skin")]
    report = evaluate_command.main(argv + selection_argv(tmp_path))
    check_cli_report(report)
    assert report["spec"]["prompt"] is None


def test_selection_is_opt_in_and_its_cap_is_checked_before_loading(capsys):
    assert "selection" not in evaluate_command.parse_configurations(None)
    assert "selection" not in evaluate_command.parse_configurations(None, unconditional=True)
    assert evaluate_command.parse_configurations("vanilla,selection", unconditional=True) == ["vanilla", "selection"]
    for extra, fragment in [
        (["--selection-max-images", "8"], "`--selection-max-images` applies to the selection configuration only"),
        (["--configurations", "selection", "--selection-max-images", "3"], "must be an integer >= the number of"),
    ]:
        with pytest.raises(SystemExit) as info:
            evaluate_command.main(["--num-images", "4", *extra])
        assert info.value.code == 2 and fragment in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The reproduction table
# ---------------------------------------------------------------------------------------------------------------


def write_chunk(jobs_dir, row, k, skin, valid, glasses=None):
    """Pool chunk k of a 4-image row (k = 0: the vanilla job, 1: the next 64 seeds): the readings given, then invalid
    images."""
    chunk = pool.pool_chunks(4, 80)[k]
    pad = [0] * (len(chunk) - len(skin))
    labels = {"skin": skin + pad, "glasses": (glasses or [0] * len(skin)) + pad, "hair": [0] * len(chunk)}
    result = {"valid": valid + pad, "labels": labels}
    (jobs_dir / f"{pool.pool_job(row.sampler, 0, chunk).key}.json").write_text(json.dumps(result))


def test_reproduce_selects_from_the_vanilla_pool_and_measures_the_kept_images(tmp_path):
    row = rows.Row("t", ("skin",), (0.5, 0.5), configurations=("selection",), batch_size=2)
    job = jobs.Job("selection", row.sampler, 4, 0, row)
    write_chunk(tmp_path, row, 0, skin=[0, 0, 0, 1], valid=[1, 1, 0, 1])  # the vanilla job: one dark image
    assert pool.select_from_pool(job, tmp_path) == (None, [1])
    write_chunk(tmp_path, row, 1, skin=[0, 1, 1, 1], valid=[1, 1, 1, 1])
    result, missing = pool.select_from_pool(job, tmp_path)
    assert missing == [] and result["labels"]["skin"] == [0, 0, 1, 1] and result["valid"] == [1, 1, 1, 1]
    assert result["selection"]["images_generated"] == 6  # the 4 vanilla images, then a round of 2
    assert "seconds" not in result  # what it cost is the images it generated, not a wall time
    vanilla = json.loads((tmp_path / f"{pool.pool_job(row.sampler, 0, range(4)).key}.json").read_text())
    summary = measures.measure(result, row, vanilla)
    assert summary["fd"] == 0.0 and summary["valid_rate"] == 1.0
    assert summary["selection"]["images_generated_per_kept"] == 1.5
    entry = {"title": "skin 50/50", "configurations": {"selection": summary}}
    table = render.selection_markdown({"num_images": 4, "rows": {"t": entry}})
    assert "| skin 50/50 | [2, 2] | 4 | 6 | 1.50 | 83.3% |" in table


def test_reproduce_selects_joint_rows_by_cell():
    row = rows.ROWS_BY_NAME["skin-x-glasses-uniform"]
    assert "selection" in row.configurations
    labels = {"skin": torch.tensor([0, 1, 1, 0]), "glasses": torch.tensor([1, 0, 1, 0])}
    assert measures.joint_cells(row, labels).tolist() == [1, 2, 3, 0]


def test_reproduce_joint_selection_fills_every_cell(tmp_path):
    row = replace(rows.ROWS_BY_NAME["skin-x-glasses-uniform"], batch_size=4)
    job = jobs.Job("selection", row.sampler, 4, 0, row)
    # cells 0, 0, 3, 1 (the second cell-0 image has no room), then 2: every cell of the 2 x 2 table once
    write_chunk(tmp_path, row, 0, skin=[0, 0, 1, 0], glasses=[0, 0, 1, 1], valid=[1, 1, 1, 1])
    write_chunk(tmp_path, row, 1, skin=[1, 1, 1, 1], glasses=[0, 0, 0, 0], valid=[0, 1, 1, 1])
    result, _ = pool.select_from_pool(job, tmp_path)
    assert result["selection"]["kept_counts"] == [1, 1, 1, 1] and result["selection"]["images_generated"] == 8
    assert result["labels"]["skin"] == [0, 1, 0, 1] and result["labels"]["glasses"] == [0, 1, 1, 0]
