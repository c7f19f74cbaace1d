"""Labellers: the toy oracle, a transformers image classifier and CLIP zero-shot (tiny models saved to tmp_path)."""

import string

import pytest
import torch
from PIL import Image

from h_classifiers import toy_world
from h_classifiers.labellers import (
    CLIPZeroShotLabeller,
    ImageClassifierLabeller,
    ToyOracleLabeller,
    build_label_mapping,
    labeller_from_spec,
)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


def some_images(n: int = 6) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def test_toy_oracle_labeller_reads_the_attribute_and_marks_invalid_images():
    data = toy_world.make_toy_dataset(24, seed=3)
    labeller = ToyOracleLabeller("hair")
    assert labeller.class_names == ["none", "black", "red"] and labeller.attribute == "hair"
    images = to_pil(data.images) + [Image.new("RGB", (32, 32), (120, 120, 120))]  # no face: invalid
    labels = labeller(images)
    assert labels[:-1].tolist() == data.labels["hair"].tolist()
    assert labels[-1] == -1
    with pytest.raises(ValueError, match="`attribute` must be one of"):
        ToyOracleLabeller("age")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny ViT classifier with labels Female / Male / Other whose prediction is fixed by its bias."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3, id2label={0: "Female", 1: "Male", 2: "Other"}, label2id={"Female": 0, "Male": 1, "Other": 2},
    )  # fmt: skip
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([1.0, 0.0, 3.0]))  # Other > Female > Male, softmax 0.11/0.04/0.84
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_image_classifier_labeller_maps_model_labels_to_our_classes(tiny_vit):
    images = some_images()
    # Default mapping by name (case-insensitive); 'Other' is not mapped, so the prediction is among Female / Male.
    labeller = ImageClassifierLabeller(str(tiny_vit), ["male", "female"], attribute="gender")
    assert labeller(images).tolist() == [1] * 6 and labeller.source == f"transformers:{tiny_vit}"
    # Many-to-one: Male and Other both count as "b" (0.04 + 0.84 > 0.11).
    merged = ImageClassifierLabeller(str(tiny_vit), ["a", "b"], label_map={"Female": "a", "Male": "b", "Other": "b"})
    assert merged(images).tolist() == [1] * 6
    # Below the confidence threshold -> -1 (Female wins over Male with 0.11 / 0.15 = 0.73).
    strict = ImageClassifierLabeller(str(tiny_vit), ["male", "female"], min_confidence=0.8)
    assert strict(images).tolist() == [-1] * 6
    with pytest.raises(ValueError, match="No model label maps to the classes \\['person'\\]"):
        ImageClassifierLabeller(str(tiny_vit), ["male", "person"])


def test_build_label_mapping_errors():
    id2label = {0: "cat", 1: "dog"}
    assert build_label_mapping(id2label, ["dog", "cat"]).tolist() == [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="model label 'cow'"):
        build_label_mapping(id2label, ["dog", "cat"], {"cow": "dog", "cat": "cat"})
    with pytest.raises(ValueError, match="not in `class_names`"):
        build_label_mapping(id2label, ["dog", "cat"], {"dog": "wolf"})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:  # character-level BPE: every word tokenizes without merges
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    assert len(tokenizer) == len(vocab)  # transformers 5 can silently build a 3-token vocabulary
    text = {"vocab_size": len(vocab), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**text, **small, "max_position_embeddings": 32},
        vision_config={**small, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_labeller_follows_the_class_prompts(tiny_clip):
    images = some_images()
    forward = CLIPZeroShotLabeller(
        str(tiny_clip), ["man", "woman"], prompts=["a photo of a man", "a photo of a woman"]
    )
    backward = CLIPZeroShotLabeller(
        str(tiny_clip), ["woman", "man"], prompts=["a photo of a woman", "a photo of a man"]
    )
    probs = forward._class_probs(images)
    assert probs.shape == (6, 2) and torch.allclose(probs.sum(-1), torch.ones(6))
    assert not torch.allclose(probs[:, 0], probs[:, 1])  # the two prompts are told apart
    # Swapping the classes (with their prompts) swaps the labels.
    assert (forward(images) == 1 - backward(images)).all()
    assert forward(images).tolist() == probs.argmax(-1).tolist()
    with pytest.raises(ValueError, match="one prompt per class"):
        CLIPZeroShotLabeller(str(tiny_clip), ["man", "woman"], prompts=["a photo of a man"])


def test_labeller_from_spec(tiny_vit):
    assert isinstance(labeller_from_spec("toy:skin"), ToyOracleLabeller)
    hf = labeller_from_spec(f"hf:{tiny_vit}", class_names=["female", "male"], attribute="gender")
    assert isinstance(hf, ImageClassifierLabeller) and hf.attribute == "gender"
    with pytest.raises(ValueError, match="`labeller` must be"):
        labeller_from_spec("oracle")
    with pytest.raises(ValueError, match="`class_names` is required"):
        labeller_from_spec(f"hf:{tiny_vit}")
    with pytest.raises(TypeError, match="PIL"):
        ToyOracleLabeller("skin")([torch.zeros(3, 32, 32)])


# ---------------------------------------------------------------------------------------------------------------
# The transformers pipelines give what the hand-written model + processor code gave (kept here as references)
# ---------------------------------------------------------------------------------------------------------------


def reference_image_classifier_probs(path, images, mapping):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model, processor = (
        AutoModelForImageClassification.from_pretrained(path).eval(),
        AutoImageProcessor.from_pretrained(path),
    )
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits.float()
    probs = logits.softmax(-1) @ mapping
    return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)


def reference_clip_probs(path, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
        text = torch.nn.functional.normalize(getattr(text, "pooler_output", text).float(), dim=-1)
        image = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image).float(), dim=-1)
        return (model.logit_scale.exp().float() * image @ text.T).softmax(-1)


@pytest.fixture(scope="module")
def random_vit(tmp_path_factory):
    """A tiny ViT with random weights (its probabilities differ from image to image); two labels share a name."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = tmp_path_factory.mktemp("random-vit")
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=4, id2label={0: "cat", 1: "dog", 2: "cat", 3: "cow"},
    )  # fmt: skip
    torch.manual_seed(1)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(50)  # spread the probabilities
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_image_classification_pipeline_gives_the_hand_written_probabilities(random_vit):
    images = some_images(7)
    for label_map in (None, {"cat": "cat", "dog": "dog", "cow": "dog"}):
        labeller = ImageClassifierLabeller(str(random_vit), ["cat", "dog"], label_map=label_map, batch_size=3)
        probs = labeller._class_probs(images)
        torch.testing.assert_close(probs, reference_image_classifier_probs(random_vit, images, labeller.mapping))
        assert probs[:, 0].std() > 0.01  # not a constant prediction
    assert labeller(images[:1]).shape == (1,)


def test_zero_shot_pipeline_gives_the_hand_written_probabilities(tiny_clip):
    images = some_images(5)
    prompts = ["a photo of a man", "a photo of a woman", "a photo of a child"]
    labeller = CLIPZeroShotLabeller(str(tiny_clip), ["man", "woman", "child"], prompts=prompts, batch_size=2)
    torch.testing.assert_close(labeller._class_probs(images), reference_clip_probs(tiny_clip, images, prompts))
    assert labeller(images[:1]).shape == (1,)
    with pytest.raises(ValueError, match="distinct"):
        CLIPZeroShotLabeller(str(tiny_clip), ["man", "woman"], prompts=["a person", "a person"])
