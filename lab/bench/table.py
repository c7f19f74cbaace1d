"""The table writer: `table.md` from a run's results (`bench.json`)."""

from __future__ import annotations

from typing import Any

from lab.bench.config import ARMS, MIN_TIMED_ROUNDS


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _syncs(counts: dict[str, Any] | None, digits: int) -> str:
    """The HostSyncCounter figure, and torch's own CUDA count after a slash where there is one."""
    if not counts:
        return "-"
    text = _num(counts.get("counter"), digits)
    if counts.get("cuda_sync_debug") is not None:
        text += f" / {_num(counts['cuda_sync_debug'], digits)}"
    return text


def markdown_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = machine.get("load_average_start")
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch threads "
        f"{machine['torch_threads']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f", dtype {machine['dtype']}; torch {machine['torch']}, diffusers {machine['diffusers']}; load average at "
        f"start {load[0]:.2f}"
        * bool(load)
        + (f", at end {results['load_average_end'][0]:.2f}" if results.get("load_average_end") else "")
        + f". Run: {results['started_utc']}, {results['total_wall_s']:.0f} s"
        + (" (--quick)" if results["config"]["quick"] else "")
        + ".",
        "",
    ]
    generation = results.get("generation", {})
    if generation:
        lines += [
            "| Scale | Arm | Median wall (s) | s/step | s/image | Wall ratio | Peak memory | Memory ratio | "
            "Guidance step (ms) | "
            "Host syncs per call | Added syncs per call / guided steps | Syncs inside a guided step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for scale, data in generation.items():
            if "skipped" in data:
                lines.append(f"| {scale} | skipped: {data['skipped']} | | | | | | | | | | |")
                continue
            cfg = " + CFG" if data["guidance_scale"] > 1 else ""
            label = (
                f"{scale}: {data['num_images']} images{cfg} ({data['unet_rows']} UNet rows), {data['steps']} "
                f"step(s) per call, h {'x'.join(map(str, data['h_shape']))}"
            )
            for arm in data.get("arm_names", ARMS):
                values = data["arms"][arm]
                r = data["ratios"].get(arm, {})
                step = values.get("guidance_step", {})
                lines.append(
                    f"| {label if arm == 'vanilla' else ''} | {arm} | {_num(values['median_s'], 2)} | "
                    f"{_num(values['s_per_step'], 3)} | {_num(values.get('s_per_image'), 3)} | "
                    f"{_num(r.get('wall')) if r else '1'} | "
                    f"{_mib(values['memory']['peak_bytes'])} | {_num(r.get('peak_memory')) if r else '1'} | "
                    f"{_num(step.get('ms_median'), 2) if step.get('available') else '-'} | "
                    f"{_syncs(values.get('host_syncs_per_call'), 0)} | "
                    f"{_syncs(r.get('syncs_per_guided_step'), 2) if r else '-'} | "
                    f"{_num((r.get('syncs_per_guided_step') or {}).get('in_step'), 2) if r else '-'} |"
                )
        lines.append("")
        for scale, data in generation.items():
            if "skipped" in data:
                continue
            classifier = data["classifier"]
            made = (
                f"calibrated: {'yes' if classifier.get('calibrated') else 'no'}, anchors: "
                f"{classifier.get('anchor_source') or 'none'}"
            )
            lines.append(
                f"- {scale}: {'; '.join(data['notes'])}; classifier: {classifier['source']}"
                + (f" ({classifier['reason']})" if classifier.get("reason") else "")
                + f", {made}; {data['warmup_rounds']} warm-up round(s) of every arm, then one untimed call per arm "
                f"counting host syncs, then {data['rounds']} timed round(s) alternating {data['order']}; memory: "
                f"{data['arms']['vanilla']['memory']['measured_in']} ({data['arms']['vanilla']['memory']['method']})."
            )
            on_device = {
                arm: data["arms"][arm].get("guidance_step_classifier_on_device", {}).get("ms_median")
                for arm in data.get("arm_names", ARMS)[1:]
            }
            if any(v is not None for v in on_device.values()):
                lines.append(
                    f"- {scale}: guidance step with the classifier moved to the device first (ms): {on_device}."
                )
        cuda = results["config"]["device"].startswith("cuda")
        lines += [
            "- Host syncs: operations that make the host wait for the device, counted around one whole call of each "
            "arm with `h_classifiers.host_syncs.HostSyncCounter`"
            + (" / with `torch.cuda.set_sync_debug_mode`" if cuda else "")
            + "; the whole call includes the UNet's and the scheduler's own. Added per call / guided steps: (guided - "
            "vanilla) per call / guided steps per call (the default `guidance_steps` guides every step); it also holds "
            "what a guided call does once before its loop (reading the classifier's timesteps and the target, which "
            "live on the host but were made outside the counter, so it counts them as device reads). Inside a guided "
            "step: counted only in the call's h function and step end (`_GuidanceRun.on_h`, `end_step`), per guided "
            "step: what the denoising loop waits for.",
            "",
        ]
    extraction = results.get("extraction", {})
    if extraction:
        if "skipped" in extraction:
            lines += [f"Extraction: skipped ({extraction['skipped']}).", ""]
        else:
            lines += [
                "| Extraction (toy, DDIM inversion) | images/s | median wall (s) |",
                "|---|---|---|",
            ]
            for batch, values in extraction["batches"].items():
                lines.append(f"| batch {batch} | {_num(values['images_per_s'], 2)} | {_num(values['median_s'], 2)} |")
            per_image = extraction["bytes_per_image"]
            lines += [
                "",
                f"{extraction['num_images']} images, {extraction['steps']} steps, h "
                f"{'x'.join(map(str, extraction['h_shape']))}; speedup batch {extraction['speedup_of'][0]} / "
                f"{extraction['speedup_of'][1]}: {_num(extraction['speedup'], 2)}x. Stored per image: fp16 "
                f"{per_image['fp16'] / 1024:.1f} KiB, fp32 {per_image['fp32'] / 1024:.1f} KiB "
                f"(ratio {_num(extraction['fp32_over_fp16'], 2)}).",
                "",
            ]
    training = results.get("training", {})
    if training:
        lines += [
            "| Training (synthetic, h " + "x".join(map(str, training["h_shape"])) + ") | value |",
            "|---|---|",
            f"| samples x timesteps trained (nominal) | {training['num_samples']} x {training['timesteps_trained']} "
            f"({training['timesteps_nominal']}) |",
            f"| one timestep slice (fp16) | {_mib(training['slice_bytes'])} |",
            f"| whole feature set, {training['timesteps_nominal']} timesteps (fp16) | "
            f"{_mib(training['feature_set_bytes_nominal'])} |",
            f"| model ({training['timesteps_trained']} heads) | {_mib(training['model_bytes'])} |",
            f"| peak RSS / increment over start | {_mib(training['memory']['peak_bytes'])} / "
            f"{_mib(training['memory']['increment_bytes'])} |",
            f"| increment / (slice + model) | {_num(training['increment_over_slice_plus_model'], 2)} |",
            f"| time per timestep (TrainingConfig(epochs={training['epochs']}), other defaults) | "
            f"{_num(training['s_per_timestep'], 1)} s |",
            "",
        ]
    targets = results.get("targets", [])
    if targets:
        lines += ["| Target | Measured | Limit | Met |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['name']} | {_num(t['value'])} | {t['limit']} | {t['verdict']} |")
        lines += [
            "",
            f"A timed figure from fewer than {MIN_TIMED_ROUNDS} timed rounds is reported but not judged against its "
            "target.",
            "",
        ]
    return "\n".join(lines)
