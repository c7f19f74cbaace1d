"""Tiny Stable Diffusion components built in-process (no download), and tiny h-classifiers that fit them.

UNet: latents 4x8x8, two blocks (32, 64 channels), so h = mid_block output is [B, 64, 4, 4]. VAE: two blocks, so
vae_scale_factor = 2 and images are 16x16. Text encoder: 2 layers, width 32. Tokenizer: a committed byte-level CLIP
BPE vocabulary (tests/fixtures/tiny_tokenizer).
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import pipeline_balancing_act as pba
from pipeline_balancing_act import HClassifier, MidBlockHook


ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny_tokenizer"
H_SHAPE = [64, 4, 4]
IMAGE_SIZE = 16
# Heads every 50 training timesteps (a coarse grid: every scheduler's timesteps map to a nearest head).
CLASSIFIER_TIMESTEPS = list(range(999, -1, -50))


def tiny_tokenizer() -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    # transformers 5 silently builds a 3-token vocabulary when it does not find the files: check.
    if len(tokenizer) < 500:
        raise RuntimeError(f"The tiny tokenizer in {TOKENIZER_DIR} loaded with only {len(tokenizer)} tokens.")
    return tokenizer


def tiny_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionPipeline (no safety checker), deterministic for a seed."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            max_position_embeddings=77,
            vocab_size=len(tokenizer),
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_classifier(
    class_names: tuple[str, ...] = ("light", "dark"),
    attribute: str = "skin",
    seed: int = 0,
    scale: float = 0.1,
    h_shape: list[int] = H_SHAPE,
    timesteps: list[int] = CLASSIFIER_TIMESTEPS,
    anchors: bool = True,
) -> HClassifier:
    """An HClassifier with random (seeded) heads of the given scale; every head is different. With `anchors`, an
    identity calibration and random class anchors of norm about 1 per class too (without: a classifier as saved
    before calibration and anchors existed, which guidance refuses)."""
    classifier = HClassifier(
        attribute=attribute, class_names=list(class_names), h_shape=list(h_shape), timesteps=list(timesteps)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * scale)
        classifier.bias.zero_()
    if anchors:
        shape = classifier.weight.shape
        classifier.set_calibration([1.0] * shape[0], [[0.0] * shape[1]] * shape[0])
        classifier.set_anchors(torch.randn(shape, generator=generator) / shape[-1] ** 0.5, "random")
    return classifier.eval()


def make_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class HRecorder:
    """
    Records, for every UNet call, h before guidance (`before`, via a MidBlockHook registered before the pipeline's
    own hook) and the h the up blocks receive (`after`, via a pre-hook on `unet.up_blocks[0]`), plus the timesteps.
    """

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.timesteps: list[float] = []
        self._handles = []
        self._mid = MidBlockHook(unet, lambda h: self.before.append(h.detach().clone()))

    def _record_up(self, module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.after.append(h.detach().clone())

    def _record_t(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.timesteps.append(float(torch.as_tensor(t).flatten()[0]))

    def __enter__(self) -> "HRecorder":
        self._mid.__enter__()
        self._handles = [
            self.unet.up_blocks[0].register_forward_pre_hook(self._record_up, with_kwargs=True),
            self.unet.register_forward_pre_hook(self._record_t, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        self._mid.__exit__(*exc_info)
        for handle in self._handles:
            handle.remove()


def guidance_is_off(unet) -> bool:
    """Nothing of a guided call is left on `unet`: no hook on its mid block (unless the user kept Balancing Act's there
    with `install_h_hook`), no h function active in this thread, and no pre-hook on the UNet."""
    hooks = list(unet.mid_block._forward_hooks.values())
    kept = [pba._h_dispatch_hook] if pba.has_h_hook(unet.mid_block, kept_only=True) else []
    return hooks == kept and pba._ACTIVE_H_FUNCTIONS.get() == () and len(unet._forward_pre_hooks) == 0
