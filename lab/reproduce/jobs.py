"""Running the jobs: a job is one configuration of one row (vanilla: of a sampler, shared by its rows), its images
generated and read by the toy oracle, its result written to `<jobs dir>/<job key>.json` (an existing file is kept, so
an interrupted run resumes and a rerun only merges). The jobs are split over the processes of `accelerate launch`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from h_classifiers.io_utils import atomic_save_image, atomic_write_json
from h_classifiers.toy_world import ATTRIBUTES, NEUTRAL_PROMPT, TOY_DDPM_PATH, TOY_MODEL_PATH
from lab.reproduce.rows import CLASSIFIER_SETS, Row, Sampler


@dataclass(frozen=True)
class Job:
    """One set of images: a configuration of a row (vanilla: of a sampler, shared by its rows)."""

    configuration: str
    sampler: Sampler
    num_images: int
    seed: int
    row: Row | None = None  # None for vanilla
    settings: tuple = ()  # overrides of the pipeline defaults (sweeps), as sorted (name, value) pairs

    @property
    def key(self) -> str:
        text = json.dumps([self.configuration, asdict(self.sampler), self.num_images, self.seed, self.settings])
        if self.row is not None:
            text += json.dumps([self.row.name, self.row.target, self.row.classifiers, self.row.batch_size])
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        name = "vanilla" if self.row is None else f"{self.row.name}-{self.configuration}"
        return f"{name}-{self.sampler.key}-{digest}"

    @property
    def cost(self) -> float:
        """Relative run time, to hand out the long jobs first."""
        factor = {"fair_diffusion": 3.0, "image_guidance": 8.0}.get(self.configuration, 1.0)
        return factor * self.sampler.steps * self.num_images


def table_jobs(rows: list[Row], num_images: int, seed: int) -> tuple[list[Job], dict[str, dict[str, Job]]]:
    """Every job of the table, and per row its jobs by configuration (vanilla shared per sampler)."""
    by_row: dict[str, dict[str, Job]] = {}
    jobs: dict[str, Job] = {}
    for row in rows:
        entry = {"vanilla": Job("vanilla", row.sampler, num_images, seed)}
        for configuration in row.configurations:
            entry[configuration] = Job(configuration, row.sampler, row.num_images or num_images, seed, row)
        by_row[row.name] = entry
        jobs.update({job.key: job for job in entry.values()})
    return list(jobs.values()), by_row


class Toolkit:
    """The toy pipeline (one per scheduler), the classifiers and the oracle, loaded once per process."""

    def __init__(self):
        from h_classifiers.evaluation import load_pipeline, set_scheduler
        from h_classifiers.toy_world import ToyOracle

        self._load_pipeline = load_pipeline
        self._sd = None  # the toy SD and its scheduler's original config
        self._ddpm = None
        self._set_scheduler = set_scheduler
        self.oracle = ToyOracle()
        self._classifiers: dict[tuple[str, str], Any] = {}

    def pipe(self, sampler: Sampler):
        """The toy pipeline of the sampler's world, with its scheduler (the toy DDPM: DDIM, eta per call)."""
        if sampler.eta is not None:
            if self._ddpm is None:
                self._ddpm = self._load_pipeline(TOY_DDPM_PATH, "cpu", "float32")
            return self._ddpm
        if self._sd is None:
            pipe = self._load_pipeline(TOY_MODEL_PATH, "cpu", "float32")
            self._sd = (pipe, dict(pipe.scheduler.config))
        pipe, config = self._sd
        self._set_scheduler(pipe, sampler.scheduler, config)
        return pipe

    def classifier(self, attribute: str, source: str):
        from pipeline_balancing_act import HClassifier

        if (attribute, source) not in self._classifiers:
            root = CLASSIFIER_SETS[source]
            self._classifiers[attribute, source] = HClassifier.from_pretrained(str(root / attribute)).eval()
        return self._classifiers[attribute, source]


def class_prompts(attribute: str) -> list[str]:
    from h_classifiers.toy_world import attribute_prompt

    return [attribute_prompt(attribute, c) for c in ATTRIBUTES[attribute]]


def vanilla_call(sampler: Sampler, num_images: int) -> tuple[list[str] | None, dict[str, Any]]:
    """A sampler's prompts (None: the unconditional world) and call arguments for `num_images` vanilla images."""
    if sampler.eta is not None:
        return None, {"num_inference_steps": sampler.steps, "eta": sampler.eta}
    return [NEUTRAL_PROMPT] * num_images, {
        "num_inference_steps": sampler.steps,
        "guidance_scale": sampler.guidance_scale,
    }


def generate_images(
    pipe, prompts, seed: int, num_images: int, batch_size: int, per_image=None, **call
) -> torch.Tensor:
    """Image i from seed `seed + i` (`generation.generate_batches`), as one `[N, 3, H, W]` tensor in [0, 1]."""
    from h_classifiers.generation import generate_batches

    count = {"num_images": num_images} if prompts is None else {}  # an unconditional pipeline: images per call
    batches = generate_batches(pipe, prompts, seed, batch_size, per_image, output_type="pt", **count, **call)
    images = [batch.output.images for batch in batches]
    return torch.cat(images) if isinstance(images[0], torch.Tensor) else torch.stack(sum(images, []))


def run_job(job: Job, kit: Toolkit) -> tuple[dict[str, Any], torch.Tensor]:
    """Generate the job's images, read them with the oracle; per image: every attribute's class, validity, asked."""
    from h_classifiers.baselines import DEFAULT_FAIR_DIFFUSION_SETTINGS, FairDiffusion, draw_classes
    from h_classifiers.metrics import asked_classes
    from pipeline_balancing_act import HOLD, BalanceState

    if job.configuration == "selection":
        raise ValueError(f"{job.key}: a selection job generates nothing itself; `run_selection_jobs` runs it.")
    pipe = kit.pipe(job.sampler)
    n, row = job.num_images, job.row
    settings = dict(job.settings)
    hold = settings.pop("hold", False)  # the hold sweep: every other attribute's classifier held
    prompts, call = vanilla_call(job.sampler, n)
    call.update(settings)
    per_image, asked = None, None
    batch_size = row.batch_size if row is not None else 64
    if row is not None and job.configuration != "vanilla":
        attribute = row.attributes[0]
        classifiers = [kit.classifier(a, row.classifiers) for a in row.attributes]
        target = list(row.target) if len(row.attributes) == 1 else [list(r) for r in row.target]
        held = [kit.classifier(a, row.classifiers) for a in ATTRIBUTES if hold and a not in row.attributes]
        if job.configuration in ("sample", "prompt"):
            asked = asked_classes(target, n)
        if held and (
            job.configuration not in ("distribution", "kl", "chi2") or not (len(row.attributes) == 1 or row.marginal)
        ):
            raise ValueError(f"{job.key}: `hold` is measured in distribution mode with marginal targets only.")
        if job.configuration == "sample":
            call.update(h_classifier=classifiers[0], guidance_mode="sample")
            per_image = {"target_classes": asked}
        elif job.configuration in ("distribution", "kl", "chi2"):
            if held:
                entries = [target] if len(classifiers) == 1 else target
                call.update(h_classifier=[*classifiers, *held], target_distribution=[*entries, *[HOLD] * len(held)])
            else:
                call.update(h_classifier=classifiers if len(classifiers) > 1 else classifiers[0])
                call["target_distribution"] = target
            call["guidance_mode"] = "distribution"
            if job.configuration != "distribution":
                call["distribution_solver"] = job.configuration
            if row.balance_state:
                call["balance_state"] = BalanceState()
        elif job.configuration == "image_guidance":
            from lab.image_guidance import comparison_sampler

            pipe = comparison_sampler(pipe, classifiers[0], None)
            call["target_distribution"] = target
        elif job.configuration == "prompt":
            prompts = [class_prompts(attribute)[k] for k in asked]
        elif job.configuration == "fair_diffusion":
            asked = draw_classes(target, n, job.seed)
            per_image = {"target_classes": asked}
            pipe = FairDiffusion(pipe, class_prompts(attribute), dict(job.settings) or DEFAULT_FAIR_DIFFUSION_SETTINGS)
            call = {k: v for k, v in call.items() if k in ("num_inference_steps", "guidance_scale")}
    start = time.perf_counter()
    images = generate_images(pipe, prompts, job.seed, n, batch_size, per_image, **call)
    seconds = time.perf_counter() - start
    reading = kit.oracle.read(images)
    result = {
        "key": job.key,
        "configuration": job.configuration,
        "row": row.name if row is not None else None,
        "sampler": asdict(job.sampler),
        "num_images": n,
        "seed": job.seed,
        "settings": dict(job.settings),
        "seconds": seconds,
        "valid": reading["valid"].int().tolist(),
        "labels": {a: reading[a].tolist() for a in ATTRIBUTES},
        "asked": asked,
    }
    if row is not None and row.balance_state:
        result["balance_state_counts"] = call["balance_state"].counts[0].tolist()
    return result, images[:64]


def run_jobs(jobs: list[Job], jobs_dir: Path, output_dir: Path, grids: dict[str, list[str]]):
    """Split the jobs that have no result file yet over the processes; each writes its results atomically."""
    from h_classifiers.commands._common import apply_threads
    from h_classifiers.distributed import num_processes, process_index, process_state, wait

    state = process_state(cpu=True)  # None for one process
    apply_threads(None, TOY_MODEL_PATH)  # the commands' thread policy for the toy model (one thread per process)
    todo = sorted((j for j in jobs if not (jobs_dir / f"{j.key}.json").exists()), key=lambda j: -j.cost)
    wait(state)  # every process has listed the jobs to do before any writes one
    mine = todo[process_index(state) :: num_processes(state)]
    if mine:
        kit = Toolkit()
        for i, job in enumerate(mine):
            result, first_images = run_job(job, kit)
            atomic_write_json(jobs_dir / f"{job.key}.json", result)
            for name in grids.get(job.key, ()):
                save_grid(first_images, output_dir / f"grid_{name}.png")
            print(
                f"[process {process_index(state)}] {i + 1}/{len(mine)} {job.key} {result['seconds']:.0f} s", flush=True
            )
    wait(state)
    return state


def save_grid(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from h_classifiers.evaluation import make_grid

    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    atomic_save_image(make_grid(pil), path)
