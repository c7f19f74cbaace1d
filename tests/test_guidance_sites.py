"""Guidance sites: a classifier reads and moves h at the mid block (the default) or at an up block's output
(`site="up_blocks.<i>"`), stored in its config; the pipeline hooks that site, extraction records h there and
training carries the site from the features to the classifier."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from tiny_models import make_generator, tiny_classifier

import pipeline_balancing_act as pba
from h_classifiers.extraction import extract_from_generation
from h_classifiers.feature_store import HFeatureStore
from h_classifiers.labellers import Labeller
from h_classifiers.training import TrainingConfig, train_classifier
from pipeline_balancing_act import HClassifier, MidBlockHook, site_h_shape, site_module


PROMPT = "a photo of a face"
UP0_SHAPE = [64, 8, 8]  # the tiny SD UNet's first up block: 64 channels, upsampled from 4x4 to 8x8


def deep_unet() -> UNet2DConditionModel:
    """Three downsamplings (8 -> 4 -> 2 -> 1), as the deep toy: h is 1x1 and the up blocks grow back."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        block_out_channels=(16, 32, 32, 48),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def pixel_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16, 24),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def sites_of(unet) -> list[str]:
    return ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


# (the deep UNet at 12 x 12: not a power of two, 12 -> 6 -> 3 -> 2 with the downsamplers' ceil, and back)
@pytest.mark.parametrize("make, size", [(deep_unet, 12), (pixel_unet, 16)], ids=["deep-sd", "pixel"])
def test_site_shapes_are_the_shapes_the_hooks_see(make, size, ba_pipe):
    for unet, size in ((make(), size), (ba_pipe.unet, 8)):
        seen = {}
        hooks = [MidBlockHook(unet, lambda h, s=s: seen.__setitem__(s, list(h.shape[1:])), s) for s in sites_of(unet)]
        for hook in hooks:
            hook.__enter__()
        try:
            x = torch.randn(2, unet.config.in_channels, size, size)
            with torch.no_grad():
                if isinstance(unet, UNet2DConditionModel):
                    unet(x, 10, encoder_hidden_states=torch.randn(2, 5, unet.config.cross_attention_dim))
                else:
                    unet(x, 10)
        finally:
            for hook in hooks:
                hook.remove()
        assert seen == {s: site_h_shape(unet, s, size, size) for s in sites_of(unet)}
        assert len(set(map(tuple, seen.values()))) > 2  # the sites differ in shape: the comparison means something


@pytest.mark.parametrize("site", ["up_blocks", "up_blocks.-1", "up_blocks.01", "down_blocks.0", "", 3, None])
def test_a_malformed_site_is_refused_with_the_accepted_forms(site):
    with pytest.raises(ValueError, match="`site` must be 'mid_block' or 'up_blocks.<i>'"):
        HClassifier(h_shape=[4, 2, 2], site=site)


def test_a_site_the_unet_lacks_is_refused_with_its_sites(ba_pipe):
    with pytest.raises(
        ValueError, match=r"no guidance site 'up_blocks.2'; its sites are \['mid_block', 'up_blocks.0'"
    ):
        site_module(ba_pipe.unet, "up_blocks.2")
    classifier = tiny_classifier(h_shape=UP0_SHAPE)
    classifier.register_to_config(site="up_blocks.5")
    with pytest.raises(ValueError, match="no guidance site 'up_blocks.5'"):
        ba_pipe(PROMPT, num_inference_steps=2, h_classifier=classifier, guidance_mode="sample", target_classes=0)


def site_classifier(site: str = "up_blocks.0", **kwargs) -> HClassifier:
    """A classifier at `site` whose anchors lie along its class weights, so a move between anchors raises the asked
    class's logit gap (a closed-form check of where the move lands)."""
    classifier = tiny_classifier(h_shape=UP0_SHAPE, scale=0.05, **kwargs)
    classifier.register_to_config(site=site)
    classifier.set_anchors(classifier.weight.detach() * 5.0, "aligned")
    return classifier


def test_the_site_is_saved_and_a_classifier_without_one_reads_the_mid_block(tmp_path):
    site_classifier().save_pretrained(tmp_path / "up0")
    assert HClassifier.from_pretrained(tmp_path / "up0").config.site == "up_blocks.0"
    tiny_classifier().save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config.pop("site")  # as saved before sites existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert HClassifier.from_pretrained(tmp_path / "old").config.site == "mid_block"


class SiteRecorder:
    """h at the mid block, h at the first up block's output before the pipeline's move (a hook entered before the
    pipeline's), and what the second up block receives (after the move)."""

    def __init__(self, unet):
        self.unet, self.mid, self.before, self.after = unet, [], [], []
        self._hooks = [
            MidBlockHook(unet, lambda h: self.mid.append(h.detach().clone())),
            MidBlockHook(unet, lambda h: self.before.append(h.detach().clone()), "up_blocks.0"),
        ]

    def _record_up1(self, module, args, kwargs):
        self.after.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone())

    def __enter__(self):
        for hook in self._hooks:
            hook.__enter__()
        self._handle = self.unet.up_blocks[1].register_forward_pre_hook(self._record_up1, with_kwargs=True)
        return self

    def __exit__(self, *exc_info):
        self._handle.remove()
        for hook in self._hooks:
            hook.remove()


def call(pipe, **kwargs):
    args = {"num_inference_steps": 3, "num_images_per_prompt": 4, "guidance_scale": 1.0, "output_type": "np"}
    return pipe(PROMPT, generator=make_generator(0), **args, **kwargs).images


def test_a_site_classifier_moves_the_up_block_output_towards_the_asked_class(ba_pipe):
    classifier = site_classifier()
    vanilla_images = call(ba_pipe)
    with SiteRecorder(ba_pipe.unet) as vanilla:
        call(ba_pipe)
    with SiteRecorder(ba_pipe.unet) as guided:
        images = call(ba_pipe, h_classifier=classifier, guidance_mode="sample", target_classes="dark")
    # The mid block is upstream of the site: at the first step it sees exactly what the unguided call saw.
    torch.testing.assert_close(guided.mid[0], vanilla.mid[0])
    # At the site, every step moves h towards "dark": its calibrated logit gap grows.
    timesteps = [float(t) for t in ba_pipe.scheduler.timesteps]
    for before, after, t in zip(guided.before, guided.after, timesteps):
        assert list(before.shape[1:]) == UP0_SHAPE
        gap = lambda h: (lambda z: z[:, 1] - z[:, 0])(classifier.calibrated_logits(h, t))  # noqa: E731
        assert (gap(after) > gap(before) + 1e-3).all()
    assert not (images == vanilla_images).all()
    assert pba._ACTIVE_H_FUNCTIONS.get() == ()  # nothing left active after the call


def test_classifiers_of_one_call_must_share_a_site(ba_pipe):
    with pytest.raises(ValueError, match=r"same site of the UNet .* got sites \['mid_block', 'up_blocks.0'\]"):
        call(
            ba_pipe,
            h_classifier=[tiny_classifier(), site_classifier(attribute="glasses", class_names=("without", "with"))],
            guidance_mode="distribution",
            target_distribution=[[0.5, 0.5], [0.5, 0.5]],
        )


def test_a_classifier_of_another_sites_shape_is_refused_naming_the_site(ba_pipe):
    wrong = tiny_classifier()  # h_shape of the mid block
    wrong.register_to_config(site="up_blocks.0")
    with pytest.raises(ValueError, match=r"gives h of shape \[64, 8, 8\] at 16x16 pixels at site 'up_blocks.0'"):
        call(ba_pipe, h_classifier=wrong, guidance_mode="sample", target_classes=0)


def test_a_site_guided_step_waits_for_no_host_read(syncs_per_site_step, ba_pipe):
    call(ba_pipe, h_classifier=site_classifier(), guidance_mode="distribution", target_distribution=[0.25, 0.75])
    assert syncs_per_site_step and max(syncs_per_site_step) == 0


@pytest.fixture
def syncs_per_site_step(monkeypatch):
    from h_classifiers.host_syncs import HostSyncCounter

    counts: list[int] = []
    on_h = pba._GuidanceRun.on_h

    def counted(run, h):
        with HostSyncCounter() as syncs:
            result = on_h(run, h)
        counts.append(syncs.count)
        return result

    monkeypatch.setattr(pba._GuidanceRun, "on_h", counted)
    return counts


class OracleOfTheBrightness(Labeller):
    """Labels an image dark (1) when its mean is under the batch's median, else light (0)."""

    class_names = ["light", "dark"]
    source = "test:brightness"

    def label(self, images) -> torch.Tensor:
        import numpy as np

        means = torch.tensor([float(np.asarray(image, dtype=np.float32).mean()) for image in images])
        return (means < means.median()).long()


def test_extraction_records_the_site_and_training_keeps_it(ba_pipe, tmp_path):
    manifest = extract_from_generation(
        ba_pipe,
        PROMPT,
        8,
        tmp_path / "h",
        OracleOfTheBrightness(),
        num_inference_steps=2,
        guidance_scale=1.0,
        batch_size=4,
        progress=False,
        site="up_blocks.0",
    )
    assert manifest["site"] == "up_blocks.0" and manifest["h_shape"] == UP0_SHAPE
    assert HFeatureStore(tmp_path / "h").site == "up_blocks.0"
    result = train_classifier(tmp_path / "h", config=TrainingConfig(epochs=2, min_steps=2), progress=False)
    assert result.classifier.config.site == "up_blocks.0"
    assert list(result.classifier.config.h_shape) == UP0_SHAPE
    # The same arguments resume the run; another site is another run.
    extract_from_generation(
        ba_pipe, PROMPT, 8, tmp_path / "h", OracleOfTheBrightness(), num_inference_steps=2, guidance_scale=1.0,
        batch_size=4, progress=False, site="up_blocks.0",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"differs in \['site'\]"):
        extract_from_generation(
            ba_pipe, PROMPT, 8, tmp_path / "h", OracleOfTheBrightness(), num_inference_steps=2, guidance_scale=1.0,
            batch_size=4, progress=False,
        )  # fmt: skip


def test_a_store_written_before_sites_existed_resumes_at_the_mid_block(ba_pipe, tmp_path):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0, "batch_size": 4, "progress": False}
    extract_from_generation(ba_pipe, PROMPT, 4, tmp_path / "h", OracleOfTheBrightness(), **kwargs)
    path = tmp_path / "h" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("site")
    path.write_text(json.dumps(manifest))
    assert HFeatureStore(tmp_path / "h").site == "mid_block"
    extract_from_generation(ba_pipe, PROMPT, 4, tmp_path / "h", OracleOfTheBrightness(), **kwargs)  # resumes


def test_extraction_refuses_a_site_the_unet_lacks(ba_pipe, tmp_path):
    with pytest.raises(ValueError, match="no guidance site 'up_blocks.9'"):
        extract_from_generation(
            ba_pipe, PROMPT, 4, tmp_path / "h", OracleOfTheBrightness(), num_inference_steps=2, progress=False,
            site="up_blocks.9",
        )  # fmt: skip
    assert not (tmp_path / "h").exists()


def test_the_extract_command_names_the_models_sites(tmp_path, capsys):
    from h_classifiers import cli

    argv = ["extract", "--prompt", PROMPT, "--num-images", "2", "--labeller", "toy:skin", "--site", "up_blocks.7"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--output-dir", str(tmp_path / "h"), "--no-progress"])
    assert "no guidance site 'up_blocks.7'; its sites are ['mid_block', 'up_blocks.0', 'up_blocks.1']" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "h").exists()
