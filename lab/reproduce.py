"""The reproduction table on the toy world, and the sweeps that chose the defaults.

    python lab/reproduce.py                                      # the table -> docs/results/
    CUDA_VISIBLE_DEVICES="" accelerate launch --multi_gpu --num_processes 2 lab/reproduce.py  # 2 processes
    python lab/reproduce.py --world ddpm                         # the unconditional table (toy DDPM)
    python lab/reproduce.py --sweep strength                     # the default-strength sweep (tuning seeds)
    python lab/reproduce.py --sweep fair-diffusion               # the Fair Diffusion settings sweep
    python lab/reproduce.py --sweep reach                        # how far h guidance can take each class

Everything runs on the toy world: the committed toy model, the neutral prompt, the toy oracle reading every
attribute of every image from its pixels. The guided configurations use the pipeline's defaults (nothing is tuned
per row). A job is one configuration of one row: its images (image i with seed `--seed + i`), the oracle's reading
of all three attributes and validity, and the classes asked of each image, written to `<jobs dir>/<job>.json`
(default `.work/reproduce-jobs/`; an existing job file is kept: an interrupted run resumes, and a rerun only merges). Jobs are split over the processes of
`accelerate launch` (`PartialState`); the main process merges them into `results.json`, `table.md` and figures.

Selection (generate vanilla images, keep each while its class has room) draws from its sampler's vanilla pool: the
vanilla job's images, then more vanilla jobs of the same size on the next seeds (`pool_job`), generated after the
other jobs and only as far as some row's counts need (`run_selection_jobs`); its job file holds the kept images'
readings and what it cost (`select_from_pool`).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from h_classifiers.io_utils import atomic_save_image, atomic_write_json, atomic_write_text  # noqa: E402
from h_classifiers.metrics import (  # noqa: E402
    TARGET_FD,
    class_counts,
    class_fractions,
    fairness_discrepancy,
    hit_rates,
)
from h_classifiers.toy_world import (  # noqa: E402
    ATTRIBUTES,
    NEUTRAL_PROMPT,
    TOY_CLASSIFIERS_PATH,
    TOY_DDPM_CLASSIFIERS_PATH,
    TOY_DDPM_PATH,
    TOY_MODEL_PATH,
)


TABLE_SEED = 0
TUNING_SEED = 1_000_000  # the sweeps' seeds: disjoint from the table's
README_CLASSIFIERS = ROOT / ".work" / "readme-classifiers"  # made by lab/readme_recipe.sh
CLASSIFIER_SETS = {
    "shipped": TOY_CLASSIFIERS_PATH,
    "toy-ddpm": TOY_DDPM_CLASSIFIERS_PATH,
    "readme": README_CLASSIFIERS,
}
SCHEDULER_LABELS = {"ddim": "DDIM", "pndm": "PNDM", "dpm++": "DPM-Solver++", "euler": "Euler", "euler_a": "Euler a"}
# The project's targets, measured here (the lab, not tests); the FD target is `metrics.TARGET_FD`.
TARGET_JOB_FD = 0.01
TARGET_VALID_DROP = 0.01
TARGET_HIT = 0.98
TARGET_ENTANGLEMENT = 0.03


@dataclass(frozen=True)
class Sampler:
    scheduler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 7.5
    # DDIM's eta of the unconditional world (None: the text-to-image world, which has classifier-free guidance)
    eta: float | None = None

    @property
    def label(self) -> str:
        if self.eta is not None:
            return f"{SCHEDULER_LABELS[self.scheduler]} {self.steps}, eta {self.eta:g}"
        return f"{SCHEDULER_LABELS[self.scheduler]} {self.steps}, CFG {self.guidance_scale:g}"

    @property
    def key(self) -> str:
        if self.eta is not None:
            return f"{self.scheduler}{self.steps}-eta{self.eta:g}"
        return f"{self.scheduler}{self.steps}-cfg{self.guidance_scale:g}"


@dataclass(frozen=True)
class Row:
    name: str
    attributes: tuple[str, ...]
    # one attribute: its class probabilities; several: a joint table (nested tuples) over their classes
    target: tuple
    sampler: Sampler = Sampler()
    classifiers: str = "shipped"  # or "readme": trained by the README recipe with default settings
    configurations: tuple[str, ...] = ("sample", "kl", "distribution", "prompt", "fair_diffusion")
    batch_size: int = 64
    balance_state: bool = False
    num_images: int | None = None  # the row's guided jobs (None: the table's --num-images)

    @property
    def marginal(self) -> bool:
        """Several attributes with one target vector each (not a joint table over their cells)."""
        return len(self.attributes) > 1 and all(abs(sum(t) - 1.0) < 1e-6 for t in self.target)

    @property
    def title(self) -> str:
        if self.marginal:
            return " + ".join(
                f"{a} {'/'.join(f'{round(100 * p)}' for p in t)}" for a, t in zip(self.attributes, self.target)
            )
        if len(self.attributes) > 1:
            return " x ".join(self.attributes) + " joint"
        t = self.target
        split = (
            f"uniform over {len(t)}" if len(t) > 2 and len(set(t)) == 1 else "/".join(f"{round(100 * p)}" for p in t)
        )
        return f"{self.attributes[0]} {split}"


SKIN_50 = (0.5, 0.5)
THIRD = (1 / 3, 1 / 3, 1 / 3)
# The target rows also measure selection. Not the scheduler and CFG rows (they test guidance's robustness; each
# sampler would need its own pool), the README-recipe rows (selection reads no classifier: the shipped rows' result)
# nor the job rows (they test BalanceState).
WITH_SELECTION = (*Row.configurations, "selection")
ROWS = (
    *(
        Row(f"skin-{a}-{100 - a}", ("skin",), (a / 100, 1 - a / 100), configurations=WITH_SELECTION)
        for a in (10, 30, 50, 70, 90)
    ),
    *(
        Row(f"glasses-{a}-{100 - a}", ("glasses",), (a / 100, 1 - a / 100), configurations=WITH_SELECTION)
        for a in (20, 50, 80)
    ),
    Row("hair-uniform", ("hair",), THIRD, configurations=WITH_SELECTION),
    Row("hair-20-40-40", ("hair",), (0.2, 0.4, 0.4), configurations=WITH_SELECTION),
    Row("hair-60-20-20", ("hair",), (0.6, 0.2, 0.2), configurations=WITH_SELECTION),
    Row(
        "skin-x-glasses-uniform",
        ("skin", "glasses"),
        ((0.25, 0.25), (0.25, 0.25)),
        configurations=("distribution", "selection"),
    ),
    Row(
        "skin-x-hair-uniform",
        ("skin", "hair"),
        ((1 / 6,) * 3, (1 / 6,) * 3),
        configurations=("distribution", "selection"),
    ),
    *(Row(f"skin-50-50-cfg{w:g}", ("skin",), SKIN_50, Sampler(guidance_scale=w)) for w in (1.0, 3.0, 12.0)),
    Row("skin-50-50-pndm50", ("skin",), SKIN_50, Sampler("pndm", 50)),
    Row("skin-50-50-dpm20", ("skin",), SKIN_50, Sampler("dpm++", 20)),
    Row("skin-50-50-euler30", ("skin",), SKIN_50, Sampler("euler", 30)),
    Row("skin-50-50-eulera30", ("skin",), SKIN_50, Sampler("euler_a", 30)),
    Row(
        "skin-50-50-readme", ("skin",), SKIN_50, classifiers="readme", configurations=("sample", "kl", "distribution")
    ),
    Row(
        "glasses-50-50-readme",
        ("glasses",),
        SKIN_50,
        classifiers="readme",
        configurations=("sample", "kl", "distribution"),
    ),
    Row("skin-30-70-job", ("skin",), (0.3, 0.7), configurations=("distribution",), batch_size=8, balance_state=True),
    Row("hair-uniform-job", ("hair",), THIRD, configurations=("distribution",), batch_size=8, balance_state=True),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# The unconditional world: the toy DDPM in the paper's setting (DDIM 50 steps, batches of 100). The main rows sample
# with eta 0, where the toy DDPM makes valid faces; the paper's eta 1 has rows of its own (docs/toy_ddpm_report.json).
DDPM = Sampler("ddim", 50, 1.0, eta=0.0)
DDPM_ETA1 = Sampler("ddim", 50, 1.0, eta=1.0)
DDPM_BATCH = 100
# The paper's peers: sample mode, its soft chi-square loss, our default, selection; and image-space guidance on one
# row per attribute (a backward pass through the UNet at every step makes it the costliest job by far).
UNCONDITIONAL_CONFIGURATIONS = ("sample", "chi2", "distribution", "selection")
WITH_IMAGE_GUIDANCE = (*UNCONDITIONAL_CONFIGURATIONS, "image_guidance")


def ddpm_row(name: str, attributes: tuple[str, ...], target: tuple, **fields: Any) -> Row:
    """A row of the unconditional world: DDIM 50 eta 0 and the paper's batches unless `fields` say otherwise."""
    fields = {
        "sampler": DDPM,
        "batch_size": DDPM_BATCH,
        "configurations": UNCONDITIONAL_CONFIGURATIONS,
        "classifiers": "toy-ddpm",
        **fields,
    }
    return Row(name, attributes, target, **fields)


DDPM_ROWS = (
    *(
        ddpm_row(
            f"{a}-{p}-{100 - p}",
            (a,),
            (p / 100, 1 - p / 100),
            **({"configurations": WITH_IMAGE_GUIDANCE} if p == 50 else {}),
        )
        for a in ("skin", "glasses")
        for p in (20, 50, 80)
    ),
    ddpm_row("hair-uniform", ("hair",), THIRD, configurations=WITH_IMAGE_GUIDANCE),
    ddpm_row("hair-20-40-40", ("hair",), (0.2, 0.4, 0.4)),
    ddpm_row("skin-glasses-50-50", ("skin", "glasses"), (SKIN_50, SKIN_50), configurations=("chi2", "distribution")),
    ddpm_row(
        "skin-x-glasses-uniform",
        ("skin", "glasses"),
        ((0.25, 0.25), (0.25, 0.25)),
        configurations=("distribution", "selection"),
    ),
    *(
        ddpm_row(f"{name}-eta1", (a,), target, sampler=DDPM_ETA1, configurations=("sample", "chi2", "distribution"))
        for name, a, target in (
            ("skin-50-50", "skin", SKIN_50),
            ("glasses-50-50", "glasses", SKIN_50),
            ("hair-uniform", "hair", THIRD),
        )
    ),
    ddpm_row(
        "skin-30-70-job",
        ("skin",),
        (0.3, 0.7),
        configurations=("distribution",),
        batch_size=10,
        balance_state=True,
        num_images=500,
    ),
)


@dataclass(frozen=True)
class World:
    """What a table runs on: the model, its classifiers, its prompt (None: an unconditional model) and its rows."""

    name: str
    model: Path
    classifiers: Path
    prompt: str | None
    rows: tuple[Row, ...]
    output_dir: Path
    jobs_dir: Path

    @property
    def rows_by_name(self) -> dict[str, Row]:
        return {row.name: row for row in self.rows}


WORLDS = {
    "sd": World(
        "sd",
        TOY_MODEL_PATH,
        TOY_CLASSIFIERS_PATH,
        NEUTRAL_PROMPT,
        ROWS,
        ROOT / "docs" / "results",
        ROOT / ".work" / "reproduce-jobs",
    ),
    "ddpm": World(
        "ddpm",
        TOY_DDPM_PATH,
        TOY_DDPM_CLASSIFIERS_PATH,
        None,
        DDPM_ROWS,
        ROOT / "docs" / "results" / "unconditional",
        ROOT / ".work" / "reproduce-jobs-ddpm",
    ),
}


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


# ----------------------------------------------------------------------------------------------------------------
# Running a job
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Selection: vanilla images kept to the target counts, drawn from a pool of vanilla jobs
# ----------------------------------------------------------------------------------------------------------------


# The smallest chunk of a vanilla pool after the vanilla job's: one call at the table's batch size (a tiny run's
# chunks of --num-images would each be a call of a few images).
POOL_CHUNK = 64


def pool_chunks(num_images: int, max_images: int) -> list[range]:
    """The image indices of each chunk of a vanilla pool: the vanilla job's images, then chunks of
    max(num_images, POOL_CHUNK) images, the last one cut at `max_images`."""
    size = max(num_images, POOL_CHUNK)
    return [range(num_images)] + [range(s, min(s + size, max_images)) for s in range(num_images, max_images, size)]


def pool_job(sampler: Sampler, seed: int, chunk: range) -> Job:
    """The vanilla job of a pool chunk: its images are those of one vanilla run of the sampler (image i with seed
    `seed + i`); the first chunk is the vanilla job itself. Shared by every row of the sampler."""
    return Job("vanilla", sampler, len(chunk), seed + chunk.start)


def joint_cells(row: Row, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each image's class of the row's attribute, or for a joint row its cell of the attributes' classes (row-major,
    as the target table flattens)."""
    cells = torch.zeros(len(labels[row.attributes[0]]), dtype=torch.long)
    for a in row.attributes:
        cells = cells * len(ATTRIBUTES[a]) + labels[a].long()
    return cells


def select_from_pool(job: Job, jobs_dir: Path) -> tuple[dict[str, Any] | None, list[int]]:
    """The result of a selection job from its sampler's vanilla pool in `jobs_dir` and [], or None and the pool
    chunks its next round still needs. The images are offered in seed order, in the rounds `balancing-act evaluate`
    would generate them (`selection.selection_rounds`: vanilla's images, then batches of the row's batch size), each
    kept while its class (a joint row: its cell) has room; invalid images never are. The result holds the kept
    images' readings, the seconds of every image generated (the pool's wall time per image) and the selection
    report."""
    from h_classifiers.selection import Selector, default_max_images, selection_rounds

    row, n = job.row, job.num_images
    max_images = default_max_images(n)
    target = torch.tensor(row.target, dtype=torch.float64).flatten().tolist()
    selector = Selector(class_counts(target, n), max_images)
    pool = pool_chunks(n, max_images)
    starts = [chunk.start for chunk in pool]
    chunks: dict[int, dict[str, Any]] = {}  # loaded chunk index -> its job's result

    def reading(i: int) -> dict[str, Any]:
        """Image i's cell, validity and labels, from its chunk."""
        k = bisect.bisect_right(starts, i) - 1
        chunk, j = chunks[k], i - starts[k]
        labels = {a: values[j] for a, values in chunk["labels"].items()}
        return {"cell": int(chunk["cells"][j]), "valid": chunk["valid"][j], "labels": labels}

    for images in selection_rounds(n, row.batch_size, max_images):
        needed = range(bisect.bisect_right(starts, images.start) - 1, bisect.bisect_right(starts, images.stop - 1))
        paths = {k: jobs_dir / f"{pool_job(job.sampler, job.seed, pool[k]).key}.json" for k in needed}
        missing = [k for k, path in paths.items() if k not in chunks and not path.exists()]
        if missing:
            return None, missing
        for k in needed:
            if k not in chunks:
                chunk = json.loads(paths[k].read_text())
                labels = {a: torch.tensor(v) for a, v in chunk["labels"].items()}
                chunk["cells"] = torch.where(torch.tensor(chunk["valid"]).bool(), joint_cells(row, labels), -1)
                chunks[k] = chunk
        selector.offer([reading(i)["cell"] for i in images])
        if selector.filled:
            break
    readings = [reading(i) for i in selector.kept]
    # The cost of every image generated: each chunk's wall time per image.
    used = {k: len(range(pool[k].start, min(pool[k].stop, selector.offered))) for k in chunks}
    seconds = sum(chunks[k]["seconds"] * used[k] / len(pool[k]) for k in chunks)
    result = {
        "key": job.key,
        "configuration": job.configuration,
        "row": row.name,
        "sampler": asdict(job.sampler),
        "num_images": len(readings),
        "seed": job.seed,
        "settings": dict(job.settings),
        "seconds": seconds,
        "valid": [r["valid"] for r in readings],
        "labels": {a: [r["labels"][a] for r in readings] for a in ATTRIBUTES},
        "asked": None,
        "selection": selector.report(),
    }
    return result, []


def run_selection_jobs(jobs: list[Job], jobs_dir: Path, output_dir: Path) -> None:
    """The selection jobs, after the other jobs (their pools start with the vanilla jobs): while one still needs a
    pool chunk, the missing chunks are generated (with several processes, as many chunks ahead as processes), and
    the main process writes each selection job as soon as its counts are filled or its cap is reached. Every process
    takes the same decisions: they depend only on the chunk files, written before `run_jobs` returns."""
    from h_classifiers.distributed import is_main, num_processes, process_state
    from h_classifiers.selection import default_max_images

    state = process_state(cpu=True)
    while True:
        missing: dict[str, Job] = {}
        for job in jobs:
            path = jobs_dir / f"{job.key}.json"
            if path.exists():
                continue
            result, needed = select_from_pool(job, jobs_dir)
            if result is not None:
                if is_main(state):
                    atomic_write_json(path, result)
                continue
            pool = pool_chunks(job.num_images, default_max_images(job.num_images))
            # With several processes, also the next chunks: the processes work side by side.
            ahead = range(needed[-1] + 1, min(needed[-1] + num_processes(state), len(pool)))
            for k in [*needed, *ahead]:
                extra = pool_job(job.sampler, job.seed, pool[k])
                missing[extra.key] = extra
        if not missing:
            return
        run_jobs(list(missing.values()), jobs_dir, output_dir, {})


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def fractions(labels: Any, valid: torch.Tensor, num_classes: int) -> list[float]:
    """`metrics.class_fractions` over the valid images; zeros when there is none."""
    return class_fractions(labels, num_classes, valid) or [0.0] * num_classes


def measure(result: dict[str, Any], row: Row, vanilla: dict[str, Any]) -> dict[str, Any]:
    """Fractions, FD, valid rate, hit rates and entanglement of one job against its row's target and vanilla."""
    valid = torch.tensor(result["valid"]).bool()
    labels = {a: torch.tensor(v) for a, v in result["labels"].items()}
    van_valid = torch.tensor(vanilla["valid"]).bool()
    valid_rate = float(valid.float().mean()) if len(valid) else 0.0  # selection may keep no image
    summary = {"valid_rate": valid_rate, "seconds": result["seconds"], "num_images": len(valid), "fractions": {}}
    # Wall time per image (selection: per image kept) against vanilla's
    summary["time_vs_vanilla"] = (result["seconds"] / max(len(valid), 1)) / (vanilla["seconds"] / len(van_valid))
    for a in ATTRIBUTES:
        summary["fractions"][a] = fractions(labels[a], valid, len(ATTRIBUTES[a]))
    if len(row.attributes) == 1:
        summary["fd"] = fairness_discrepancy(list(row.target), summary["fractions"][row.attributes[0]])
    elif row.marginal:  # one target per attribute: each attribute's FD, and the row's is the largest
        per_attribute = {
            a: fairness_discrepancy(list(t), summary["fractions"][a]) for a, t in zip(row.attributes, row.target)
        }
        summary["fd_per_attribute"] = per_attribute
        summary["fd"] = max(per_attribute.values())
    else:
        # A joint row: one "class" per cell of the attributes' classes.
        target = torch.tensor(row.target, dtype=torch.float64).flatten().tolist()
        measured = fractions(joint_cells(row, labels), valid, len(target))
        summary["cell_fractions"] = measured
        summary["fd"] = fairness_discrepancy(target, measured)
    if result.get("asked") is not None:
        # The asked class of the row's attribute; an invalid image is a miss in the strict rate.
        asked_labels = torch.where(valid, labels[row.attributes[0]], -1)
        hit_valid, hit_strict = hit_rates(asked_labels, result["asked"])
        summary["hit_strict"], summary["hit_valid"] = hit_strict, hit_valid or 0.0
    entanglement = {}
    for a in ATTRIBUTES:
        if a not in row.attributes:
            base = torch.tensor(fractions(torch.tensor(vanilla["labels"][a]), van_valid, len(ATTRIBUTES[a])))
            entanglement[a] = float((torch.tensor(summary["fractions"][a]) - base).abs().max())
    summary["entanglement"] = entanglement
    summary["entanglement_max"] = max(entanglement.values()) if entanglement else None
    if "balance_state_counts" in result:
        # The counts distribution guidance aims at: the pipeline's largest-remainder apportionment (sums to n).
        target_counts = class_counts(row.target, result["num_images"])
        summary["balance_state_counts"] = result["balance_state_counts"]
        summary["oracle_counts"] = torch.bincount(labels[row.attributes[0]][valid], minlength=len(row.target)).tolist()
        summary["target_counts"] = target_counts
    if "selection" in result:  # what keeping images to the target cost (`select_from_pool`)
        summary["selection"] = result["selection"]
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


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


def check_targets(row: Row, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's targets for one row: value, threshold and whether it is met (None: not applicable)."""
    vanilla, default = measured["vanilla"], measured.get("distribution")
    checks: dict[str, Any] = {}
    if default is not None:
        fd_target = TARGET_JOB_FD if row.balance_state else TARGET_FD
        checks["distribution FD"] = (default["fd"], fd_target, default["fd"] <= fd_target)
        drop = vanilla["valid_rate"] - default["valid_rate"]
        checks["valid drop (points)"] = (100 * drop, 100 * TARGET_VALID_DROP, drop <= TARGET_VALID_DROP)
        if default["entanglement_max"] is not None:
            e = default["entanglement_max"]
            checks["entanglement (points)"] = (100 * e, 100 * TARGET_ENTANGLEMENT, e <= TARGET_ENTANGLEMENT)
        image_space = measured.get("image_guidance")
        if image_space is not None:  # lower FD than image-space guidance at lower cost: both shown
            better = default["fd"] < image_space["fd"] and default["time_vs_vanilla"] < image_space["time_vs_vanilla"]
            shown = (default["fd"], image_space["fd"], default["time_vs_vanilla"], image_space["time_vs_vanilla"])
            checks["beats image-space guidance"] = (shown, None, better)
        peer = measured.get("fair_diffusion")
        if peer is not None:
            # Lower FD at no lower valid rate: both are shown (FDs, then valid rates).
            better = default["fd"] < peer["fd"] and default["valid_rate"] >= peer["valid_rate"]
            shown = (default["fd"], peer["fd"], default["valid_rate"], peer["valid_rate"])
            checks["beats Fair Diffusion"] = (shown, None, better)
    sample = measured.get("sample")
    if sample is not None:
        checks["sample strict hit"] = (sample["hit_strict"], TARGET_HIT, sample["hit_strict"] >= TARGET_HIT)
    return checks


def merge(rows: list[Row], by_row: dict[str, dict[str, Job]], jobs_dir: Path) -> dict[str, Any]:
    results = {}
    for row in rows:
        loaded = {c: json.loads((jobs_dir / f"{job.key}.json").read_text()) for c, job in by_row[row.name].items()}
        measured = {c: measure(result, row, loaded["vanilla"]) for c, result in loaded.items()}
        results[row.name] = {
            "title": row.title,
            "attributes": list(row.attributes),
            "target": row.target,
            "sampler": row.sampler.label,
            "classifiers": row.classifiers,
            "batch_size": row.batch_size,
            "balance_state": row.balance_state,
            "configurations": measured,
            "targets": check_targets(row, measured),
        }
    return results


def settings_summary() -> dict[str, Any]:
    import pipeline_balancing_act as pba
    from h_classifiers.baselines import DEFAULT_FAIR_DIFFUSION_SETTINGS
    from lab.image_guidance import DEFAULT_IMAGE_GUIDANCE_SCALE

    return {
        "guidance_strength": pba.DEFAULT_GUIDANCE_STRENGTH,
        "guidance_margin": pba.GUIDANCE_MARGIN,
        "switch_penalty": pba.SWITCH_PENALTY,
        "guided_branches": "cond",
        "soft_solver_temperature": pba.DEFAULT_TEMPERATURE,
        "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE,
        "fair_diffusion": DEFAULT_FAIR_DIFFUSION_SETTINGS,
    }


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _fractions(summary: dict[str, Any], row: Row) -> str:
    if row.marginal:
        return "; ".join(
            " / ".join(f"{c} {p:.3f}" for c, p in zip(ATTRIBUTES[a], summary["fractions"][a])) for a in row.attributes
        )
    if len(row.attributes) > 1:
        return " / ".join(f"{p:.3f}" for p in summary["cell_fractions"])
    a = row.attributes[0]
    return " / ".join(f"{c} {p:.3f}" for c, p in zip(ATTRIBUTES[a], summary["fractions"][a]))


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _target(row: Row) -> str:
    flat = [p for r in row.target for p in r] if len(row.attributes) > 1 else list(row.target)
    return " / ".join(f"{p:.3g}" for p in flat)


CONFIG_LABELS = {
    "vanilla": "vanilla",
    "sample": "sample",
    "kl": "distribution, paper's soft KL",
    "chi2": "distribution, paper's soft chi-square",
    "image_guidance": "image-space guidance (x0 classifier)",
    "distribution": "distribution, default (assign)",
    "prompt": "prompt",
    "fair_diffusion": "Fair Diffusion",
    "selection": "selection (vanilla, kept to the counts)",
}


def summary_markdown(report: dict[str, Any]) -> list[str]:
    """The table in one line per attribute (joint rows together): its rows, the ranges of FD with the default
    settings and vanilla, of the valid rate's change against vanilla and of the entanglement."""
    world = WORLDS[report.get("world", "sd")]
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, entry in report["rows"].items():
        if "distribution" in entry["configurations"]:
            row = world.rows_by_name[name]
            group = row.attributes[0] if len(row.attributes) == 1 else "marginal" if row.marginal else "joint"
            groups.setdefault(group, []).append(entry)

    def span(values: list[float], fmt: str) -> str:
        low, high = min(values), max(values)
        return format(low, fmt) if format(low, fmt) == format(high, fmt) else f"{low:{fmt}} to {high:{fmt}}"

    lines = [
        "## Summary per attribute (default settings)",
        "",
        "| Attribute | Rows | FD, default | FD, vanilla | Valid rate against vanilla (points) | Entanglement (points) |",
        "|---|---|---|---|---|---|",
    ]
    for attribute, entries in groups.items():
        default = [e["configurations"]["distribution"] for e in entries]
        vanilla = [e["configurations"]["vanilla"] for e in entries]
        drops = [100 * (d["valid_rate"] - v["valid_rate"]) for d, v in zip(default, vanilla)]
        tangled = [100 * d["entanglement_max"] for d in default if d.get("entanglement_max") is not None]
        lines.append(
            f"| {attribute} | {len(entries)} | {span([d['fd'] for d in default], '.3f')} | "
            f"{span([v['fd'] for v in vanilla], '.3f')} | {span(drops, '+.1f')} | "
            f"{span(tangled, '.1f') if tangled else ''} |"
        )
    return lines + [""]


def table_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    world = WORLDS[report.get("world", "sd")]  # results written before the unconditional world have no "world"
    sd = world.prompt is not None  # a text-to-image toy
    title = {"sd": "toy world", "ddpm": "toy DDPM"}[world.name]
    lines = [
        "<!-- generated by lab/reproduce.py: do not edit by hand -->",
        f"# Reproduction table ({title})",
        "",
        *summary_markdown(report),
        f"{report['num_images']} images per configuration (image i: seed {report['seed']} + i), "
        + (
            f"prompt {NEUTRAL_PROMPT!r}"
            if sd
            else "the unconditional toy DDPM (no prompt; image-space guidance: the shipped x0 classifiers, scale "
            f"{report['settings'].get('image_guidance_scale')})"
        )
        + ", the toy oracle reading every image. Guided configurations use the pipeline defaults "
        f"(`{json.dumps({k: v for k, v in report['settings'].items() if k != 'fair_diffusion'})}`); Fair Diffusion "
        f"uses `{json.dumps(report['settings']['fair_diffusion'])}` (tuned on seeds {TUNING_SEED}+, "
        "`fair_diffusion_sweep.md`). Fractions: over valid images; FD = ||target - fractions||_2 (joint rows: over "
        "the cells); hit: the asked class (sample, prompt) or the drawn class (Fair Diffusion), strict = over all "
        "images (an invalid image is a miss), then over valid images; entanglement: the largest change, in points, of "
        "any class fraction of the attributes not guided, against vanilla. Selection: vanilla images kept while "
        "their class (joint rows: their cell) has room, until the target counts are filled; its images are valid by "
        "construction, and what they cost is in the last section. "
        f"Wall time: {report['seconds'] / 60:.1f} min over {report['processes']} process(es) on {report['machine']}.",
        "",
        "| Row | Sampler | Batch | Configuration | Measured | FD | Valid | Hit (strict / valid) | Entanglement "
        "| Time per image / vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in rows.items():
        row = world.rows_by_name[name]
        batch = f"{entry['batch_size']}" + (" + state" if entry["balance_state"] else "")
        classifier = " (README-recipe classifier)" if entry["classifiers"] == "readme" else ""
        for configuration, summary in entry["configurations"].items():
            hit = ""
            if "hit_strict" in summary:
                hit = f"{_pct(summary['hit_strict'])} / {_pct(summary['hit_valid'])}"
            ent = (
                ""
                if summary["entanglement_max"] is None or configuration == "vanilla"
                else _pct(summary["entanglement_max"])
            )
            lines.append(
                f"| {entry['title']}{classifier} (target {_target(row)}) | {entry['sampler']} | {batch} | "
                f"{CONFIG_LABELS[configuration]} | {_fractions(summary, row)} | {summary['fd']:.3f} | "
                f"{_pct(summary['valid_rate'])} | {hit} | {ent} | {_ratio(summary.get('time_vs_vanilla'))} |"
            )
    lines += ["", "## Targets, default settings (met / missed, and by how much)", ""]
    lines += ["| Row | Target | Value | Threshold | Met |", "|---|---|---|---|---|"]
    for name, entry in rows.items():
        for check, (value, threshold, met) in entry["targets"].items():
            if isinstance(value, tuple | list):
                shown = f"FD {value[0]:.3f} vs {value[1]:.3f}"
                if check == "beats image-space guidance":
                    shown += f", time per image {value[2]:.2f} vs {value[3]:.2f} x vanilla"
                elif len(value) == 4:  # results written before the valid rates were part of the check have two
                    shown += f", valid {_pct(value[2])} vs {_pct(value[3])}"
            else:
                shown = f"{value:.3f}" if "points" not in check else f"{value:.1f}"
            limit = "" if threshold is None else (f"{threshold:.3f}" if "points" not in check else f"{threshold:.1f}")
            lines.append(
                f"| {entry['title']} ({name}) | {check} | {shown} | {limit} | {'met' if met else '**missed**'} |"
            )
    jobs = [e for e in rows.values() if e["balance_state"]]
    if jobs:
        lines += ["", "## Jobs in small batches with `BalanceState`", ""]
        lines += ["| Row | Target counts | Counts in the state | Oracle counts (valid images) |", "|---|---|---|---|"]
        for entry in jobs:
            summary = entry["configurations"]["distribution"]
            lines.append(
                f"| {entry['title']} | {summary['target_counts']} | {summary['balance_state_counts']} | "
                f"{summary['oracle_counts']} |"
            )
    lines += selection_markdown(report)
    return "\n".join(lines) + "\n"


def selection_markdown(report: dict[str, Any]) -> list[str]:
    """The table's section on selection: per row the images generated per image kept, and its seconds against
    distribution mode's for the same number of images."""
    entries = [
        (e, e["configurations"]["selection"]) for e in report["rows"].values() if "selection" in e["configurations"]
    ]
    if not entries:
        return []
    from h_classifiers.selection import SELECTION_MAX_FACTOR

    lines = [
        "",
        "## Selection: images generated per image kept",
        "",
        "Selection generates vanilla images in seed order (the vanilla configuration's, then batches of the row's "
        "batch size) and keeps each valid image while its class (joint rows: its cell) has room, until the target "
        f"counts are filled or {SELECTION_MAX_FACTOR} x {report['num_images']} images were generated. Its seconds are "
        "those of every image generated (the vanilla runs' wall time per image), labelling excluded.",
        "",
        "| Row | Target counts | Kept | Generated | Generated per kept | Valid among generated | Seconds, selection / "
        "distribution |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry, summary in entries:
        selected = summary["selection"]
        kept = f"{selected['images_kept']}" + ("" if selected["filled"] else f", short by {selected['shortfall']}")
        ratio = selected["images_generated_per_kept"]
        distribution = entry["configurations"].get("distribution")
        seconds = f"{summary['seconds']:.0f}" + ("" if distribution is None else f" / {distribution['seconds']:.0f}")
        lines.append(
            f"| {entry['title']} | {selected['target_counts']} | {kept} | {selected['images_generated']} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {_pct(selected['generated_valid_rate'])} | {seconds} |"
        )
    return lines


def write_figures(report: dict[str, Any], output_dir: Path) -> None:
    from h_classifiers.evaluation import save_fraction_chart

    for name, entry in report["rows"].items():
        if len(entry["attributes"]) > 1:
            continue
        a = entry["attributes"][0]
        measured = {CONFIG_LABELS[c]: s["fractions"][a] for c, s in entry["configurations"].items()}
        save_fraction_chart(
            list(entry["target"]), measured, ATTRIBUTES[a], output_dir / f"fractions_{name}.png", entry["title"]
        )


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def run_table(args: argparse.Namespace) -> dict[str, Any] | None:
    from h_classifiers.distributed import is_main, num_processes

    world = WORLDS[args.world]
    rows = [world.rows_by_name[n] for n in args.rows.split(",")] if args.rows else list(world.rows)
    if any(r.classifiers == "readme" for r in rows) and not (README_CLASSIFIERS / "skin").is_dir():
        raise SystemExit(
            f"The README-recipe classifiers are missing: run lab/readme_recipe.sh (-> {README_CLASSIFIERS})."
        )
    output_dir = Path(args.output_dir)
    jobs, by_row = table_jobs(rows, args.num_images, args.seed)
    grids: dict[str, list[str]] = {}  # job key -> names of the grids of its first 64 images
    for r in ("skin-50-50", "glasses-50-50", "hair-uniform"):
        for c in ("vanilla", "distribution", "fair_diffusion", "image_guidance") if r in by_row else ():
            if c in by_row[r]:
                grids.setdefault(by_row[r][c].key, []).append(f"{r}_{c}")
    start = time.perf_counter()
    selection = [job for job in jobs if job.configuration == "selection"]
    state = run_jobs([job for job in jobs if job.configuration != "selection"], Path(args.jobs_dir), output_dir, grids)
    run_selection_jobs(selection, Path(args.jobs_dir), output_dir)
    if not is_main(state):
        return None
    report = {
        "world": args.world,
        "num_images": args.num_images,
        "seed": args.seed,
        "settings": settings_summary(),
        "seconds": time.perf_counter() - start,
        "processes": num_processes(state),
        "machine": machine(),
        "rows": merge(rows, by_row, Path(args.jobs_dir)),
    }
    atomic_write_json(output_dir / "results.json", report)
    atomic_write_text(output_dir / "table.md", table_markdown(report))
    write_figures(report, output_dir)
    write_front_page_figure(output_dir)
    return report


def write_front_page_figure(output_dir: Path) -> None:
    """vanilla_vs_balanced.png: the first 64 seeds of skin 50/50, vanilla next to distribution mode's defaults."""
    from PIL import Image

    from h_classifiers.evaluation import side_by_side

    paths = [output_dir / f"grid_skin-50-50_{c}.png" for c in ("vanilla", "distribution")]
    if all(p.exists() for p in paths):
        with Image.open(paths[0]) as vanilla, Image.open(paths[1]) as balanced:
            panels = [
                ("vanilla", vanilla.convert("RGB")),
                ("balanced: 50/50 light/dark skin", balanced.convert("RGB")),
            ]
            atomic_save_image(side_by_side(panels), output_dir / "vanilla_vs_balanced.png")


# ----------------------------------------------------------------------------------------------------------------
# The sweeps (tuning seeds, disjoint from the table's)
# ----------------------------------------------------------------------------------------------------------------

STRENGTH_ROWS = (
    Row("tune-skin-50-50", ("skin",), SKIN_50, configurations=("sample", "distribution")),
    Row("tune-skin-20-80", ("skin",), (0.2, 0.8), configurations=("distribution",)),
    Row("tune-skin-90-10", ("skin",), (0.9, 0.1), configurations=("distribution",)),
    Row("tune-skin-50-50-cfg3", ("skin",), SKIN_50, Sampler(guidance_scale=3.0), configurations=("distribution",)),
    Row("tune-skin-50-50-cfg1", ("skin",), SKIN_50, Sampler(guidance_scale=1.0), configurations=("distribution",)),
    Row("tune-glasses-50-50", ("glasses",), SKIN_50, configurations=("sample", "distribution")),
    Row("tune-glasses-20-80", ("glasses",), (0.2, 0.8), configurations=("distribution",)),
    Row("tune-hair-uniform", ("hair",), THIRD, configurations=("distribution",)),
)
FAIR_DIFFUSION_ROWS = (
    Row("tune-skin-50-50", ("skin",), SKIN_50, configurations=("fair_diffusion",)),
    Row("tune-glasses-50-50", ("glasses",), SKIN_50, configurations=("fair_diffusion",)),
    Row("tune-hair-uniform", ("hair",), THIRD, configurations=("fair_diffusion",)),
)
STRENGTHS = (3.0, 5.0, 8.0)
# The reach sweep: every image asked the same class, at growing strengths. It measures what moving h can do at all
# for each class of each shipped classifier (what the table's misses are bounded by); it chooses nothing.
REACH_ROWS = tuple(
    Row(
        f"reach-{attribute}-{name}",
        (attribute,),
        tuple(float(k == c) for k in range(len(classes))),
        configurations=("sample",),
    )
    for attribute, classes in ATTRIBUTES.items()
    for c, name in enumerate(classes)
)
REACH_STRENGTHS = (2.5, 5.0, 10.0, 20.0)
# The same rows on the toy DDPM (h after three downsamplings), in the paper's batches.
DDPM_REACH_ROWS = tuple(
    ddpm_row(row.name, row.attributes, row.target, configurations=("sample",)) for row in REACH_ROWS
)
# The default strength and the toy SD sweep's largest (each DDPM image costs 50 steps, the SD world's 25).
DDPM_REACH_STRENGTHS = (5.0, 20.0)
# The hold sweep: distribution mode with the other attributes' classifiers held ("hold") or not; entanglement is the
# measure. Rows the table misses entanglement on, and one of each attribute.
HOLD_ROWS = (
    Row("hold-skin-30-70", ("skin",), (0.3, 0.7), configurations=("distribution",)),
    Row("hold-skin-50-50", ("skin",), SKIN_50, configurations=("distribution",)),
    Row("hold-glasses-50-50", ("glasses",), SKIN_50, configurations=("distribution",)),
    Row("hold-hair-uniform", ("hair",), THIRD, configurations=("distribution",)),
)
DDPM_HOLD_ROWS = tuple(
    ddpm_row(row.name, row.attributes, row.target, configurations=row.configurations) for row in HOLD_ROWS
)
HOLD_GRID = ((("hold", False),), (("hold", True),))
FAIR_DIFFUSION_GRID = tuple(
    (("edit_guidance_scale", g), ("edit_threshold", t), ("edit_warmup_steps", w))
    for g in (3.0, 5.0, 8.0)
    for w in (2, 5)
    for t in (0.8, 0.9)
)


def run_sweep(args: argparse.Namespace) -> dict[str, Any] | None:
    from h_classifiers.distributed import is_main

    ddpm = args.world == "ddpm"
    if args.sweep == "strength":
        rows, grid = STRENGTH_ROWS, [(("guidance_strength", s),) for s in STRENGTHS]
    elif args.sweep == "reach":
        rows, strengths = (DDPM_REACH_ROWS, DDPM_REACH_STRENGTHS) if ddpm else (REACH_ROWS, REACH_STRENGTHS)
        grid = [(("guidance_strength", s),) for s in strengths]
    elif args.sweep == "hold":
        rows, grid = DDPM_HOLD_ROWS if ddpm else HOLD_ROWS, list(HOLD_GRID)
    else:
        rows, grid = FAIR_DIFFUSION_ROWS, list(FAIR_DIFFUSION_GRID)
    jobs_dir = Path(args.jobs_dir)
    jobs, entries = {}, []
    for row in rows:
        vanilla = Job("vanilla", row.sampler, args.num_images, args.seed)
        jobs[vanilla.key] = vanilla
        for settings in grid:
            for configuration in row.configurations:
                job = Job(configuration, row.sampler, args.num_images, args.seed, row, settings)
                jobs[job.key] = job
                entries.append((row, configuration, settings, job, vanilla))
    start = time.perf_counter()
    if not is_main(run_jobs(list(jobs.values()), jobs_dir, Path(args.output_dir), {})):
        return None
    load = lambda job: json.loads((jobs_dir / f"{job.key}.json").read_text())  # noqa: E731
    results = []
    for row, configuration, settings, job, vanilla in entries:
        summary = measure(load(job), row, load(vanilla))
        van = measure(load(vanilla), row, load(vanilla))
        result = {"row": row.name, "configuration": configuration, "settings": dict(settings), **summary}
        result["vanilla_valid"] = van["valid_rate"]
        if 1.0 in row.target:  # one class asked of every image: how many reached it, against vanilla
            asked, attribute = row.target.index(1.0), row.attributes[0]
            result["reached"] = summary["fractions"][attribute][asked]
            result["vanilla_reached"] = van["fractions"][attribute][asked]
        results.append(result)
    report = {
        "sweep": args.sweep,
        "num_images": args.num_images,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    if args.sweep in ("strength", "fair-diffusion"):
        report["choice"] = choose(results)
    report["world"] = args.world
    atomic_write_json(Path(args.output_dir) / f"sweep_{args.sweep}.json", report)
    atomic_write_text(Path(args.output_dir) / f"sweep_{args.sweep}.md", sweep_markdown(report))
    return report


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting with the lowest mean FD over the rows (distribution mode for the strength sweep), among those
    whose mean valid rate is at most one point below vanilla's; without such a setting, the lowest mean FD."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["configuration"] in ("distribution", "fair_diffusion"):
            by_setting.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
    scores = []
    for key, rs in by_setting.items():
        mean_fd = sum(r["fd"] for r in rs) / len(rs)
        drop = sum(r["vanilla_valid"] - r["valid_rate"] for r in rs) / len(rs)
        scores.append((drop > TARGET_VALID_DROP, mean_fd, key, drop))
    scores.sort()
    _, mean_fd, key, drop = scores[0]
    return {"settings": json.loads(key), "mean_fd": mean_fd, "mean_valid_drop": drop}


def sweep_markdown(report: dict[str, Any]) -> str:
    intro = f"{report['num_images']} images per setting, seeds {report['seed']}+ (disjoint from the table's). "
    if "choice" in report:
        choice = report["choice"]
        intro += (
            "Choice rule (`choose`): lowest mean FD over the rows among settings whose mean valid rate is at most one "
            f"point below vanilla's. Chosen: `{json.dumps(choice['settings'])}` (mean FD {choice['mean_fd']:.3f}, "
            f"mean valid drop {100 * choice['mean_valid_drop']:.1f} points). "
        )
    elif report["sweep"] == "hold":
        intro += (
            "Distribution mode with the defaults; `hold: true` passes every other attribute's shipped classifier "
            'with the target "hold" (the guided move loses the held heads\' directions). Entanglement: the largest '
            "change, in points, of any class fraction of the attributes not guided, against vanilla; the sweep "
            "measures and chooses nothing. "
        )
    else:
        intro += (
            "Every image is asked the row's class (sample mode). Reached: the fraction of valid images of that class, "
            "against vanilla's; the sweep measures what moving h can do and chooses nothing. "
        )
    if report.get("world") == "ddpm":
        intro += "The unconditional toy DDPM (DDIM 50, eta 0, batches of 100). "
    lines = [
        "<!-- generated by lab/reproduce.py --sweep: do not edit by hand -->",
        f"# Sweep: {report['sweep']}",
        "",
        intro + f"Wall time {report['seconds'] / 60:.1f} min.",
        "",
        "| Settings | Row | Configuration | FD | Valid | Vanilla valid | Hit (strict / valid) | Reached (vanilla) "
        "| Entanglement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        reached = f"{_pct(r['reached'])} ({_pct(r['vanilla_reached'])})" if "reached" in r else ""
        hit = "" if r.get("hit_strict") is None else f"{_pct(r['hit_strict'])} / {_pct(r['hit_valid'])}"
        lines.append(
            f"| `{json.dumps(r['settings'])}` | {r['row']} | {r['configuration']} | {r['fd']:.3f} | "
            f"{_pct(r['valid_rate'])} | {_pct(r['vanilla_valid'])} | {hit} | {reached} | {_pct(r['entanglement_max'])} |"
        )
    return "\n".join(lines) + "\n"


# The reach sweeps read side by side (`--reach-comparison`): each one's JSON, and how its h is taken. The first up
# block's and the deep toy's are records: the lab no longer runs them (commit 7d1b3a3 does).
REACH_SWEEPS = (
    ("toy SD, mid block (h [64, 4, 4], one downsampling)", ROOT / "docs" / "results" / "sweep_reach.json"),
    ("toy SD, first up block (h [64, 8, 8])", ROOT / "docs" / "results" / "sweep_site.json"),
    (
        "deep toy SD, mid block (h [128, 1, 1], three downsamplings)",
        ROOT / "docs" / "results" / "deep" / "sweep_reach.json",
    ),
    (
        "toy DDPM, mid block (h [128, 4, 4], three downsamplings)",
        ROOT / "docs" / "results" / "unconditional" / "sweep_reach.json",
    ),
)


def reach_comparison_markdown(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """Per class and strength, the fraction of valid images that reached the class, one column per sweep (with the
    valid rate and the entanglement beside it; blank where a sweep did not run that strength), and vanilla's
    fraction."""
    lines = [
        "<!-- generated by lab/reproduce.py --reach-comparison: do not edit by hand -->",
        "# Reach, side by side",
        "",
        "Every image asked one class (sample mode, tuning seeds), read by the toy oracle: the fraction of valid images "
        "of that class (vanilla's in brackets), the valid rate, and the entanglement (the largest change, in points, of "
        "another attribute's class fractions against vanilla). Each sweep's own page has every setting: "
        + ", ".join(
            f"[{label}]({path.relative_to(ROOT / 'docs' / 'results').as_posix().replace('.json', '.md')})"
            for label, path in REACH_SWEEPS
        )
        + ".",
        "",
        "| Class | Strength | " + " | ".join(label for label, _ in reports) + " |",
        "|---|---|" + "---|" * len(reports),
    ]
    cells: dict[tuple[str, float], dict[str, str]] = {}
    for label, report in reports:
        for r in report["results"]:
            cells.setdefault((r["row"], r["settings"]["guidance_strength"]), {})[label] = (
                f"{_pct(r['reached'])} ({_pct(r['vanilla_reached'])}); valid {_pct(r['valid_rate'])}, "
                f"ent. {100 * r['entanglement_max']:.1f}"
            )
    order = [row.name for row in REACH_ROWS]
    for (row, strength), by_label in sorted(cells.items(), key=lambda item: (order.index(item[0][0]), item[0][1])):
        name = row.removeprefix("reach-").replace("-", ": ", 1)
        lines.append(
            f"| {name} | {strength:g} | " + " | ".join(by_label.get(label, "") for label, _ in reports) + " |"
        )
    return "\n".join(lines) + "\n"


def write_reach_comparison(output: Path) -> str:
    reports = [(label, json.loads(path.read_text())) for label, path in REACH_SWEEPS if path.exists()]
    text = reach_comparison_markdown(reports)
    atomic_write_text(output, text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab/reproduce.py",
        description="The reproduction table on the toy world (docs/results/), or a sweep that chose a default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", default="", help="Comma-separated subset of the table's rows (default: all).")
    parser.add_argument("--num-images", type=int, default=None, help="Images per job (table 512, sweeps 256).")
    parser.add_argument(
        "--seed", type=int, default=None, help=f"First seed (table {TABLE_SEED}, sweeps {TUNING_SEED})."
    )
    parser.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default="sd",
        help="sd: the toy Stable Diffusion model; ddpm: the unconditional toy DDPM (the paper's setting).",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where results go (sd: docs/results, ddpm: docs/results/unconditional).",
    )
    parser.add_argument(
        "--jobs-dir",
        default=None,
        help="Where each job's per-image results go (sd: .work/reproduce-jobs, ddpm: .work/reproduce-jobs-ddpm).",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="Rewrite the world's table.md from its results.json (runs nothing).",
    )
    parser.add_argument(
        "--reach-comparison",
        action="store_true",
        help="Write docs/results/reach_comparison.md from the reach sweeps' results (runs nothing).",
    )
    parser.add_argument(
        "--sweep",
        choices=("strength", "fair-diffusion", "reach", "hold"),
        default=None,
        help="Run a sweep instead (ddpm: reach and hold).",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    from h_classifiers.commands._parser import silence_known_notices

    silence_known_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reach_comparison:
        write_reach_comparison(Path(args.output_dir or ROOT / "docs" / "results") / "reach_comparison.md")
        return None
    world = WORLDS[args.world]
    args.output_dir = args.output_dir or str(world.output_dir)
    if args.render:
        report = json.loads((Path(args.output_dir) / "results.json").read_text())
        atomic_write_text(Path(args.output_dir) / "table.md", table_markdown(report))
        return report
    args.jobs_dir = args.jobs_dir or str(world.jobs_dir)
    unknown = [n for n in args.rows.split(",") if n and n not in world.rows_by_name]
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; rows: {', '.join(world.rows_by_name)}")
    if args.sweep in ("strength", "fair-diffusion") and args.world != "sd":
        parser.error(f"--sweep {args.sweep} tunes the text-to-image world's defaults; use --world sd.")
    if args.sweep:
        args.num_images = args.num_images or 256
        args.seed = TUNING_SEED if args.seed is None else args.seed
        return run_sweep(args)
    args.num_images = args.num_images or (DDPM_BATCH if args.world == "ddpm" else 512)
    args.seed = TABLE_SEED if args.seed is None else args.seed
    return run_table(args)


if __name__ == "__main__":
    main()
