"""Reliability figures of a guided call on the toy Stable Diffusion: a non-finite h (which calls return, which raise, in
how many seconds), the hooks left on the UNet, a compiled UNet's unguided call, concurrent calls on shared components,
and the shared tokenizer. Writes `docs/lab/reliability.json` and the page rendered from it, `docs/lab/reliability.md`.

    python -m lab.reliability            # about two minutes on one CPU thread
    python -m lab.reliability --render   # the page again from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import copy
import json
import logging
import threading
import time

import numpy as np
import torch

from h_classifiers.io_utils import atomic_write_json, atomic_write_text
from lab import LAB_DOCS


OUTPUT = LAB_DOCS / "reliability.json"
PROMPT = "a photo of a face"
IMAGES, STEPS = 8, 25
HANG_AFTER_S = 240.0  # a call still running then is reported as hanging (the measurement waited 4 minutes)


def toy():
    from h_classifiers.toy_world import TOY_CLASSIFIERS_PATH, TOY_MODEL_PATH
    from pipeline_balancing_act import BalancingActPipeline, HClassifier

    pipe = BalancingActPipeline.from_pretrained(TOY_MODEL_PATH)
    pipe.set_progress_bar_config(disable=True)
    classifiers = {name: HClassifier.from_pretrained(TOY_CLASSIFIERS_PATH / name) for name in ("skin", "hair")}
    return pipe, classifiers


def timed_in_thread(fn) -> dict:
    """Run `fn` in a thread (in this context); how it ended and after how many seconds."""
    outcome, context = {}, contextvars.copy_context()

    def target():
        try:
            fn_result = context.run(fn)
            outcome["result"] = "returned" if fn_result is None else fn_result
        except Exception as error:  # noqa: BLE001 - reported, not raised
            outcome["result"] = f"raised {type(error).__name__}: {str(error).splitlines()[0][:160]}"

    start = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_AFTER_S)
    seconds = time.perf_counter() - start
    return {"outcome": outcome.get("result", f"still running after {HANG_AFTER_S:g} s"), "seconds": round(seconds, 2)}


class WarningCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        if "not finite" in record.getMessage():
            self.lines.append(record.getMessage())


def non_finite_cases(pipe, classifiers) -> list[dict]:
    from pipeline_balancing_act import MidBlockHook, assign_classes

    skin, hair = classifiers["skin"], classifiers["hair"]
    cases = {
        "skin 50/50, assign (K = 2)": {"h_classifier": skin, "target_distribution": [0.5, 0.5]},
        "hair uniform, assign (K = 3)": {"h_classifier": hair, "target_distribution": [1 / 3] * 3},
        "skin x hair joint, assign": {
            "h_classifier": [skin, hair],
            "target_distribution": [[1 / 6] * 3, [1 / 6] * 3],
        },
        "hair uniform, kl": {"h_classifier": hair, "target_distribution": [1 / 3] * 3, "distribution_solver": "kl"},
        "hair uniform, chi2": {
            "h_classifier": hair,
            "target_distribution": [1 / 3] * 3,
            "distribution_solver": "chi2",
        },
        "sample mode, hair": {
            "h_classifier": hair,
            "guidance_mode": "sample",
            "target_classes": [0, 1, 2] * 2 + [0, 1],
        },
    }
    rows = []
    logger = logging.getLogger("pipeline_balancing_act")
    for value in (float("nan"), float("inf")):

        def poison(h, value=value):
            h = h.clone()
            h[[1, IMAGES + 1]] = value  # image 1, both classifier-free guidance branches
            return h

        for name, kwargs in cases.items():
            counter = WarningCounter()
            logger.addHandler(counter)
            args = {"guidance_mode": "distribution", **kwargs}

            def call(args=args):
                images = pipe(
                    PROMPT, num_inference_steps=STEPS, num_images_per_prompt=IMAGES, output_type="np", **args
                ).images
                finite = [bool(np.isfinite(image).all()) for image in images]
                return f"returned ({sum(finite)} of {IMAGES} images finite)"

            with MidBlockHook(pipe.unet, poison):
                row = timed_in_thread(call)
            logger.removeHandler(counter)
            rows.append({"case": f"{name}, h = {value}", **row, "warnings": counter.lines})
    cost = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
    cost[2, 1] = float("nan")
    row = timed_in_thread(lambda: f"returned {assign_classes(cost, [2, 2, 2]).tolist()}")
    rows.append({"case": "assign_classes(cost 6 x 3 with one NaN, [2, 2, 2])", **row, "warnings": []})
    return rows


def hooks_on_the_unet(pipe, classifiers) -> dict:
    from diffusers import StableDiffusionPipeline

    from pipeline_balancing_act import BalancingActPipeline

    stock = StableDiffusionPipeline.from_pipe(pipe)
    made = BalancingActPipeline.from_pipe(stock)
    made.set_progress_bar_config(disable=True)
    counts = {"after construction": len(made.unet.mid_block._forward_hooks)}
    made(PROMPT, num_inference_steps=2, num_images_per_prompt=2, output_type="np")
    counts["after an unguided call"] = len(made.unet.mid_block._forward_hooks)
    made(PROMPT, num_inference_steps=2, num_images_per_prompt=2, output_type="np", h_classifier=classifiers["skin"],
         guidance_mode="distribution", target_distribution=[0.5, 0.5])  # fmt: skip
    counts["after a guided call"] = len(made.unet.mid_block._forward_hooks)
    return counts


def compiled_unet(pipe) -> dict:
    """A UNet compiled with a backend that counts the graphs Dynamo hands it and runs them eagerly."""
    from diffusers import StableDiffusionPipeline

    from pipeline_balancing_act import BalancingActPipeline

    def graphs_of(cls, fullgraph):
        torch._dynamo.reset()
        graphs = []

        def backend(graph_module, example_inputs):
            graphs.append(1)
            return graph_module.forward

        made = cls.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
        made.set_progress_bar_config(disable=True)
        made.unet = torch.compile(made.unet, backend=backend, fullgraph=fullgraph)
        try:
            made(PROMPT, num_inference_steps=2, num_images_per_prompt=2, output_type="np")
            outcome = "returned"
        except Exception as error:  # noqa: BLE001 - reported
            outcome = f"raised {type(error).__name__}"
        return {"outcome": outcome, "graphs": len(graphs)}

    result = {
        "stock SD, unguided": graphs_of(StableDiffusionPipeline, False),
        "Balancing Act, unguided": graphs_of(BalancingActPipeline, False),
        "Balancing Act, unguided, fullgraph=True": graphs_of(BalancingActPipeline, True),
    }
    torch._dynamo.reset()
    return result


def concurrent_calls(pipe, classifiers, trials: int) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline_balancing_act import BalancingActPipeline

    guided_args = {
        "h_classifier": classifiers["skin"],
        "guidance_mode": "distribution",
        "target_distribution": [0.5, 0.5],
    }

    def generate(made, **kwargs):
        return made(PROMPT, num_inference_steps=4, num_images_per_prompt=2, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip

    results = {}
    for kind in ("Balancing Act unguided", "stock SD with its own tokenizer", "stock SD sharing the tokenizer"):
        guided = BalancingActPipeline.from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if kind.startswith("Balancing"):
            vanilla = BalancingActPipeline.from_pipe(guided, scheduler=scheduler)
        elif "own" in kind:
            vanilla = StableDiffusionPipeline.from_pipe(
                guided, scheduler=scheduler, tokenizer=copy.deepcopy(pipe.tokenizer)
            )
        else:
            vanilla = StableDiffusionPipeline.from_pipe(guided, scheduler=scheduler)
        for made in (guided, vanilla):
            made.set_progress_bar_config(disable=True)
        alone = {"guided": generate(guided, **guided_args), "vanilla": generate(vanilla)}
        changed = 0
        for trial in range(trials):
            order = ["guided", "vanilla"] if trial % 2 == 0 else ["vanilla", "guided"]
            out, start = {}, threading.Barrier(2)

            def run(name):
                start.wait(60)
                out[name] = generate(guided, **guided_args) if name == "guided" else generate(vanilla)

            threads = [threading.Thread(target=run, args=(name,)) for name in order]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            changed += sum(not np.array_equal(out.get(name), alone[name]) for name in alone)
        results[kind] = {"trials": trials, "calls changed": changed}
    return results


def tokenizer_race(pipe, calls: int) -> dict:
    from pipeline_balancing_act import tokenizer_lock

    tokenizer = pipe.tokenizer

    def count(locked: bool) -> int:
        wrong, start = [0, 0], threading.Barrier(2)

        def run(i):
            start.wait(60)
            for _ in range(calls):
                with tokenizer_lock(tokenizer) if locked else contextlib.nullcontext():
                    if i == 0:
                        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
                        wrong[i] += len(ids) != 77
                    else:
                        wrong[i] += len(tokenizer(PROMPT, padding="longest").input_ids) == 77

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(wrong)

    return {"calls per thread": calls, "wrong without the lock": count(False), "wrong with the lock": count(True)}


def render(report: dict) -> str:
    lines = [
        "<!-- generated by python -m lab.reliability: do not edit by hand -->",
        "# Reliability of a guided call",
        "",
        f"Generated by `python -m lab.reliability` from [reliability.json](reliability.json) (toy Stable Diffusion, "
        f"{report['threads']} CPU thread(s), torch {report['torch']}, diffusers {report['diffusers']}). "
        "Seconds are wall time on a shared machine: they say whether a call returns, not how fast.",
        "",
        f"## A non-finite h ({IMAGES} images, {STEPS} steps, image 1's h set at every step)",
        "",
        "| case | outcome | seconds | warnings |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['outcome']} | {r['seconds']:.2f} | {len(r['warnings'])} |" for r in report["non_finite"]
    ]
    example = next((r["warnings"][0] for r in report["non_finite"] if r["warnings"]), None)
    if example:
        lines += ["", f'The warning: "{example}"']
    lines += ["", "## Hooks on `unet.mid_block`", "", "| when | hooks |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["hooks"].items()]
    lines += ["", "## A compiled UNet's unguided call (graphs Dynamo compiled)", "", "| call | outcome | graphs |"]
    lines += ["|---|---|---:|"] + [f"| {k} | {v['outcome']} | {v['graphs']} |" for k, v in report["compiled"].items()]
    lines += ["", "## A guided and a vanilla call in two threads on shared components", ""]
    lines += ["| vanilla pipeline | trials (both start orders) | calls changed |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['trials']} | {v['calls changed']} |" for k, v in report["concurrent"].items()]
    race = report["tokenizer"]
    lines += [
        "",
        "## The shared tokenizer",
        "",
        f'Two threads tokenizing with `padding="max_length"` and `padding="longest"`, {race["calls per thread"]} calls '
        f"each: {race['wrong without the lock']} wrongly padded results without the lock, "
        f"{race['wrong with the lock']} with the project's `tokenizer_lock`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", action="store_true", help="Only render the page from the committed JSON.")
    parser.add_argument("--trials", type=int, default=40, help="Concurrent trials per vanilla pipeline (default 40).")
    args = parser.parse_args(argv)
    if not args.render:
        import diffusers

        torch.set_num_threads(1)
        pipe, classifiers = toy()
        report = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "non_finite": non_finite_cases(pipe, classifiers),
            "hooks": hooks_on_the_unet(pipe, classifiers),
            "compiled": compiled_unet(pipe),
            "concurrent": concurrent_calls(pipe, classifiers, args.trials),
            "tokenizer": tokenizer_race(pipe, 20000),
        }
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(OUTPUT, report)
    page = render(json.loads(OUTPUT.read_text(encoding="utf-8")))
    atomic_write_text(OUTPUT.with_suffix(".md"), page)
    print(page)


if __name__ == "__main__":
    main()
