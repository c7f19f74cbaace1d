"""The one generation loop (`generation.generate_batches`): image i gets seed + i, prompt i and row i of every
per-image argument whatever the batch size, and every tool that generates goes through it."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from h_classifiers.generation import batch_ranges, generate_batches


class RecordingPipe:
    """One image per call row whose red value is its generator's seed; records what each call received."""

    def __init__(self, output_type="pil"):
        self.calls = []
        self.output_type = output_type

    def __call__(self, generator, output_type="pil", **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"seeds": seeds, **kwargs})
        if output_type == "pt":
            return SimpleNamespace(
                images=torch.tensor(seeds, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
            )
        return SimpleNamespace(images=[Image.new("RGB", (2, 2), (s % 256, 0, 0)) for s in seeds])


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 8, 50])
def test_image_i_gets_seed_prompt_and_row_i_whatever_the_batch_size(batch_size):
    n, seed = 7, 40
    pipe = RecordingPipe()
    per_image = {"target_classes": [i % 3 for i in range(n)], "prompt_embeds": torch.arange(n).view(n, 1)}
    batches = list(
        generate_batches(pipe, [f"p{i}" for i in range(n)], seed, batch_size, per_image, num_inference_steps=2)
    )
    assert [i for b in batches for i in b.indices] == list(range(n))
    assert [len(c["prompt"]) for c in pipe.calls] == [len(b.indices) for b in batches]
    assert all(len(b.indices) <= batch_size for b in batches)
    assert [s for c in pipe.calls for s in c["seeds"]] == [seed + i for i in range(n)]
    assert [p for c in pipe.calls for p in c["prompt"]] == [f"p{i}" for i in range(n)]
    assert [k for c in pipe.calls for k in c["target_classes"]] == [i % 3 for i in range(n)]
    assert torch.cat([c["prompt_embeds"] for c in pipe.calls]).flatten().tolist() == list(range(n))
    assert all(c["num_inference_steps"] == 2 for c in pipe.calls)
    reds = [image.getpixel((0, 0))[0] for b in batches for image in b.output.images]
    assert reds == [seed + i for i in range(n)]


def test_prompt_embeds_alone_and_bad_lengths():
    pipe = RecordingPipe()
    (batch,) = generate_batches(pipe, None, 0, 8, {"prompt_embeds": torch.zeros(3, 2)})
    assert batch.indices == range(3) and "prompt" not in pipe.calls[0]
    with pytest.raises(ValueError, match="one entry per image"):
        list(generate_batches(pipe, ["a", "b"], 0, 2, {"target_classes": [0]}))
    with pytest.raises(ValueError, match="nothing says how many"):
        list(generate_batches(pipe, None, 0, 2))
    progress = []
    list(generate_batches(pipe, ["a"] * 5, 0, 2, progress=progress.append))
    assert progress == [len(r) for r in batch_ranges(5, 2)] and sum(progress) == 5


def test_toy_report_samples_one_seed_per_image():
    from lab.toy_report import sample_images

    for batch_size in (2, 5):
        pipe = RecordingPipe()
        images = sample_images(pipe, "a face", 5, batch_size, steps=2, guidance_scale=1.0, seed=10)
        assert images[:, 0, 0, 0].tolist() == [10, 11, 12, 13, 14]
        assert [p for c in pipe.calls for p in c["prompt"]] == ["a face"] * 5


def test_bench_arms_use_one_seed_per_image():
    from lab.bench import arms

    stock = RecordingPipe()
    scale = SimpleNamespace(stock=stock, guided=None, num_images=3, call_kwargs={"prompt": ["a"] * 3, "steps": 1})
    arms.run_arm(scale, "vanilla", SimpleNamespace(seed=5))
    assert stock.calls == [{"seeds": [5, 6, 7], "prompt": ["a"] * 3, "steps": 1}]
    embeds = {"prompt_embeds": torch.zeros(3, 4), "negative_prompt_embeds": torch.ones(3, 4)}
    scale.call_kwargs = dict(embeds, height=8)
    arms.run_arm(scale, "vanilla", SimpleNamespace(seed=0))
    assert stock.calls[-1]["seeds"] == [0, 1, 2] and torch.equal(
        stock.calls[-1]["negative_prompt_embeds"], embeds["negative_prompt_embeds"]
    )
