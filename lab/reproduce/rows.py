"""What the reproduction table and the sweeps run: the samplers, the rows (a target for one attribute, or several),
the worlds (a model with its classifiers, its rows and where its results go), the targets the table checks, and the
rows and settings of each sweep."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h_classifiers.toy_world import (
    ATTRIBUTES,
    NEUTRAL_PROMPT,
    TOY_CLASSIFIERS_PATH,
    TOY_DDPM_CLASSIFIERS_PATH,
    TOY_DDPM_PATH,
    TOY_MODEL_PATH,
)
from lab import LAB_DOCS, ROOT


TABLE_SEED = 0
TUNING_SEED = 1_000_000  # the sweeps' seeds: disjoint from the table's
README_CLASSIFIERS = ROOT / ".work" / "readme-classifiers"  # made by lab/readme_recipe.sh
POOLED_CLASSIFIERS = ROOT / ".work" / "pooled-classifiers"  # made by lab/pooled_recipe.sh
CLASSIFIER_SETS = {
    "shipped": TOY_CLASSIFIERS_PATH,
    "toy-ddpm": TOY_DDPM_CLASSIFIERS_PATH,
    "readme": README_CLASSIFIERS,
    "pooled": POOLED_CLASSIFIERS,
}
# The label of each classifier set but the shipped one in the table's rows.
CLASSIFIER_LABELS = {"readme": "README-recipe classifier", "pooled": "pooled classifier"}
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
    # Pooled heads (h averaged to 2 x 2 before the heads), trained on the shipped classifiers' extraction: each
    # single-attribute target row again, to compare with the shipped flat heads on the same seeds.
    *(
        Row(f"{a}-{split}-pooled", (a,), target, classifiers="pooled", configurations=("sample", "distribution"))
        for a, split, target in (
            *(("skin", f"{p}-{100 - p}", (p / 100, 1 - p / 100)) for p in (10, 30, 50, 70, 90)),
            *(("glasses", f"{p}-{100 - p}", (p / 100, 1 - p / 100)) for p in (20, 50, 80)),
            ("hair", "uniform", THIRD),
            ("hair", "20-40-40", (0.2, 0.4, 0.4)),
            ("hair", "60-20-20", (0.6, 0.2, 0.2)),
        )
    ),
    Row("skin-30-70-job", ("skin",), (0.3, 0.7), configurations=("distribution",), batch_size=8, balance_state=True),
    Row("hair-uniform-job", ("hair",), THIRD, configurations=("distribution",), batch_size=8, balance_state=True),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# The unconditional world: the toy DDPM in the paper's setting (DDIM 50 steps at eta 1, batches of 100); deterministic
# DDIM (eta 0, DDIMPipeline's default) has rows of its own.
DDPM = Sampler("ddim", 50, 1.0, eta=1.0)
DDPM_ETA0 = Sampler("ddim", 50, 1.0, eta=0.0)
DDPM_BATCH = 100
# The paper's peers: sample mode, its soft chi-square loss, our default, selection; and image-space guidance on one
# row per attribute (a backward pass through the UNet at every step makes it the costliest job by far).
UNCONDITIONAL_CONFIGURATIONS = ("sample", "chi2", "distribution", "selection")
WITH_IMAGE_GUIDANCE = (*UNCONDITIONAL_CONFIGURATIONS, "image_guidance")


def ddpm_row(name: str, attributes: tuple[str, ...], target: tuple, **fields: Any) -> Row:
    """A row of the unconditional world: DDIM 50 eta 1 and the paper's batches unless `fields` say otherwise."""
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
        ddpm_row(f"{name}-eta0", (a,), target, sampler=DDPM_ETA0, configurations=("sample", "chi2", "distribution"))
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
        LAB_DOCS / "results",
        ROOT / ".work" / "reproduce-jobs",
    ),
    "ddpm": World(
        "ddpm",
        TOY_DDPM_PATH,
        TOY_DDPM_CLASSIFIERS_PATH,
        None,
        DDPM_ROWS,
        LAB_DOCS / "results" / "unconditional",
        ROOT / ".work" / "reproduce-jobs-ddpm",
    ),
}


# The sweeps' rows and settings (tuning seeds, disjoint from the table's)
SWEEPS = ("strength", "fair-diffusion", "reach", "hold")
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
# The same rows on the toy DDPM where they have a DDPM counterpart (not the CFG rows), in the paper's sampler and
# batches: whether an unconditional model needs a default strength of its own.
DDPM_STRENGTH_ROWS = tuple(
    ddpm_row(row.name, row.attributes, row.target, configurations=row.configurations)
    for row in STRENGTH_ROWS
    if row.sampler == Sampler()
)
DDPM_STRENGTHS = (0.5, 1.0, 2.0, 3.0, 5.0)
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
# The unconditional default strength and the toy SD sweep's largest (each DDPM image costs 50 steps, the SD world's 25).
DDPM_REACH_STRENGTHS = (1.0, 20.0)
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
