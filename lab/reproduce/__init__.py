"""The reproduction table on the toy world, and the sweeps that chose the defaults. From a checkout's root:

    python -m lab.reproduce                                      # the table -> docs/lab/results/
    python -m lab.reproduce --world ddpm                         # the unconditional table (toy DDPM)
    python -m lab.reproduce --sweep strength                     # the default-strength sweep (tuning seeds)
    python -m lab.reproduce --sweep fair-diffusion               # the Fair Diffusion settings sweep
    python -m lab.reproduce --sweep reach                        # how far h guidance can take each class
    python -m lab.reproduce --render                             # table.md again from results.json, runs nothing
    CUDA_VISIBLE_DEVICES="" accelerate launch --multi_gpu --num_processes 2 -m lab.reproduce  # 2 processes

Everything runs on the toy world: the committed toy model, the neutral prompt, the toy oracle reading every
attribute of every image from its pixels. The guided configurations use the pipeline's defaults (nothing is tuned
per row). A job is one configuration of one row: its images (image i with seed `--seed + i`), the oracle's reading
of all three attributes and validity, and the classes asked of each image, written to `<jobs dir>/<job>.json`
(default `.work/reproduce-jobs/`; an existing job file is kept: an interrupted run resumes, and a rerun only merges).
Jobs are split over the processes of `accelerate launch` (`PartialState`); the main process merges them into
`results.json`, `table.md` and figures.

The modules, in the order a run uses them:

- `rows`: what runs: samplers, rows, worlds, the targets, the sweeps' rows and settings;
- `jobs`: a job, and running jobs over the processes;
- `pool`: selection, kept from a pool of vanilla jobs;
- `measures`: what a job's readings measure, the targets checked, the merge of a table;
- `render`: the Markdown pages and figures, from the results alone;
- `runner`: a table or a sweep from start to files;
- `cli`: the command line (`__main__`).
"""
