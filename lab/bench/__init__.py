"""The cost of Balancing Act next to stock Stable Diffusion, measured side by side (a research tool, not installed).

python -m lab.bench [--threads 2] [--device cpu] [--quick] [--parts generation,extraction,training]

Three parts, each measured in this one process (memory peaks of CPU runs in fresh worker processes, see below):

1. generation: stock `StableDiffusionPipeline` vs `BalancingActPipeline` (built with `from_pipe`, so the very same
   modules) in distribution and in sample mode, same seeds and steps. Every arm first runs one untimed warm-up round,
   then one untimed call per arm counts its host-device synchronisations, then the timed rounds alternate the order of
   the arms (forward, reversed, ...); medians and guided/vanilla ratios of wall time and peak memory, and the
   synchronisations a guided step adds. Two scales by default: the committed toy model (batch 64, 25 steps, its
   shipped skin classifier) and SD1.5 shapes (a `UNet2DConditionModel` from the SD1.5 config with random weights,
   512 px, so h is [*, 1280, 8, 8], with classifier-free guidance; batch 1 and 1 step per call on CPU, batch 8 and 20
   steps on CUDA; precomputed random prompt embeddings and `output_type="latent"` for every arm, so no text encoder or
   VAE runs, and a classifier made as `balancing-act train` makes one, on synthetic h). A third, `--scales celebahq`:
   the paper's unconditional model's shapes (a `UNet2DModel` from google/ddpm-celebahq-256's config with random
   weights, 256 px, h [*, 512, 8, 8]; `DDIMPipeline` vs `BalancingActUnconditionalPipeline`, distribution mode only;
   batch 2, 1 step per call and 2 timed rounds by default). The guidance step alone (what runs between the UNet's mid
   block and its first up block: the pipeline's hook on h) is also timed at every UNet call of the timed rounds
   (`GuidanceStepTimer`).
2. extraction: images/s of `extract_from_folders` (DDIM inversion, fp16 shards) at batch 1 vs batch 16 on the toy
   model, in alternating order after a warm-up, and bytes stored per image in fp16 vs fp32 shards.
3. training: `train_classifier` on synthetic SD1.5-shaped features (2,000 images, h 1280x8x8) written shard by shard:
   peak memory and time per timestep, next to the size of one timestep's slice and of the whole feature set.

A target is judged only on a figure of at least MIN_TIMED_ROUNDS timed rounds; the table marks any other as "not
judged". Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident set's high-water mark (VmHWM,
reset through /proc/self/clear_refs just before the measured call). A process keeps freed heap memory, so on CPU each
arm's peak is measured in a fresh worker process (`--memory subprocess`); the full SD1.5 and celebahq scales on CPU
measure it in-process during the timed runs by default (`--memory auto`), because a worker would cost one more long
UNet call per arm. Output: `<output-dir>/bench.json` and `<output-dir>/table.md`.

The modules: `config` (what is measured, the targets, the shapes, a run's configuration), `measuring` (machine,
memory, timing, worker processes), `arms` (the pipelines and classifier of each scale, one call of an arm), one module
per part (`generation`, `extraction`, `training`), `targets` (the verdicts), `table` (the table writer) and `cli`.
"""
