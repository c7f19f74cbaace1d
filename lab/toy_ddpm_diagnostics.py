"""What the toy DDPM's report measures beyond its samples: how well the UNet predicts the noise per timestep, and how
much its images depend on h.

- **Noise fit per timestep.** Held-out toy faces noised to timestep t; the mean squared error of the predicted noise,
  its slope on the true noise (`<e_pred, e> / <e, e>`), and the same slope for each image's mean colour (the noise
  averaged over the image, per channel). A slope under 1 means the UNet leaves part of the noise in the image. A mean
  slope near 0 at high t means the UNet does not see the noise's mean colour, so its estimate of the image's colour is
  off; DDIM at eta 0 keeps that error fixed along the path, while at eta 1 every step samples it afresh and the colours
  drift (the oracle's colour check fails).
- **h dependence.** The same seeds generated twice: as the UNet makes them, and with h (the mid block's output)
  replaced by zeros at every step. If the images barely change, the skip connections carry the image and no move of h
  can change it.
"""

from __future__ import annotations

import torch

from h_classifiers.toy_world import ATTRIBUTES, ToyOracle, make_toy_dataset


FIT_TIMESTEPS = (1, 5, 10, 20, 50, 100, 200, 400, 600, 800, 980)


@torch.no_grad()
def noise_fit(unet, train_config: dict, num_images: int = 256, seed: int = 999, batch_size: int = 64) -> dict:
    """Per timestep of `FIT_TIMESTEPS`: the noise prediction's mean squared error and slope on held-out images (a
    dataset seed the training never draws)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**train_config)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    x0 = make_toy_dataset(num_images, seed=seed).images * 2 - 1
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for t in FIT_TIMESTEPS:
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.full((num_images,), t)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        predicted = torch.cat(
            [unet(noisy[i : i + batch_size], timesteps[i : i + batch_size]).sample for i in range(0, num_images, 64)]
        )
        rows[str(t)] = {
            "mse": round(float(((predicted - noise) ** 2).mean()), 5),
            "slope": round(float((predicted * noise).sum() / (noise * noise).sum()), 4),
            # the same slope for each image's mean colour (the noise's mean per channel)
            "mean_slope": round(float((mean(predicted) * mean(noise)).sum() / mean(noise).pow(2).sum()), 4),
        }
    return rows


def h_dependence(pipe, sample, etas: list[float], num_images: int = 64, seed: int = 1_000_000) -> dict:
    """Per eta: the mean absolute pixel change when h is zeroed at every step, the valid rates both ways, and per
    attribute the fraction of images (valid both ways) whose oracle class changed. `sample(pipe, n, eta, seed)` draws
    the images in [0, 1]."""
    from pipeline_balancing_act import MidBlockHook

    oracle, out = ToyOracle(), {}
    for eta in etas:
        vanilla = sample(pipe, num_images, eta, seed)
        with MidBlockHook(pipe.unet, torch.zeros_like):
            zeroed = sample(pipe, num_images, eta, seed)
        before, after = oracle.read(vanilla), oracle.read(zeroed)
        both = before["valid"] & after["valid"]
        out[f"eta_{eta:g}"] = {
            "num_images": num_images,
            "seed": seed,
            "mean_abs_change": round(float((vanilla - zeroed).abs().mean()), 4),
            "valid_vanilla": float(before["valid"].float().mean()),
            "valid_zeroed": float(after["valid"].float().mean()),
            "class_changed": {
                a: float((before[a] != after[a])[both].float().mean()) if int(both.sum()) else None for a in ATTRIBUTES
            },
        }
    return out


def diagnostics_markdown(models: dict[str, dict]) -> list[str]:
    """Markdown lines comparing the models' noise fit and h dependence (`models`: name -> its report's
    `diagnostics`)."""
    lines = [
        "",
        "## Noise fit per timestep",
        "",
        "Held-out toy faces noised to timestep t: the slope of the predicted noise on the true noise (1 is exact; "
        "under 1, part of the noise stays in the image), its mean squared error in brackets, and below it the "
        "slope of each image's mean colour (the noise's mean per channel).",
        "",
        "| model | " + " | ".join(f"t={t}" for t in FIT_TIMESTEPS) + " |",
        "|---|" + "---|" * len(FIT_TIMESTEPS),
    ]
    for name, d in models.items():
        cells = " | ".join(
            f"{d['noise_fit'][str(t)]['slope']:.3f} ({d['noise_fit'][str(t)]['mse']:.3f})" for t in FIT_TIMESTEPS
        )
        lines.append(f"| {name} | {cells} |")
        means = " | ".join(f"{d['noise_fit'][str(t)]['mean_slope']:.3f}" for t in FIT_TIMESTEPS)
        lines.append(f"| {name}, mean colour | {means} |")
    lines += [
        "",
        "## How much the images depend on h",
        "",
        "The same seeds generated twice, as the UNet makes them and with h (the mid block's output) zeroed at every "
        "step (the samples' DDIM). Mean absolute pixel change (images in [0, 1]); per attribute, the fraction of images whose "
        "oracle class changed, among those valid both ways.",
        "",
        "| model | sampler | images | mean pixel change | valid (vanilla / h = 0) | "
        + " | ".join(f"{a} changed" for a in ATTRIBUTES)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(ATTRIBUTES),
    ]
    for name, d in models.items():
        for key, r in d["h_dependence"].items():
            changed = " | ".join("" if v is None else f"{100 * v:.1f}%" for v in r["class_changed"].values())
            lines.append(
                f"| {name} | DDIM, {key.replace('_', ' ')} | {r['num_images']} | {r['mean_abs_change']:.4f} | "
                f"{100 * r['valid_vanilla']:.1f}% / {100 * r['valid_zeroed']:.1f}% | {changed} |"
            )
    return lines
