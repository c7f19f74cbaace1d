"""The early checks of the command line (`h_classifiers.preflight`): a bad path or a classifier of another model is one
argparse line before torch or diffusers are imported, and the copies of the pipeline's constants and rules it checks
with stay equal to the pipeline's."""

import ast
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pipeline_balancing_act as pba
from h_classifiers import cli, preflight
from h_classifiers.toy_assets import TOY_CLASSIFIERS_PATH, TOY_DDPM_PATH, TOY_MODEL_PATH


ROOT = Path(__file__).resolve().parent.parent
TOY_MODELS = [TOY_MODEL_PATH, TOY_DDPM_PATH]
SD_SKIN = TOY_CLASSIFIERS_PATH / "skin"  # the toy SD's: h [64, 4, 4]
DDPM_SKIN = TOY_CLASSIFIERS_PATH / "toy-ddpm" / "skin"  # the toy DDPM's: h [128, 4, 4]
pytestmark = pytest.mark.skipif(
    not all((model / "model_index.json").is_file() for model in TOY_MODELS) or not (SD_SKIN / "config.json").is_file(),
    reason="the committed toy models or classifiers are missing",
)


# ---------------------------------------------------------------------------------------------------------------
# The copies are the pipeline's
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MAX_GUIDANCE_STRENGTH",
        "DISTRIBUTION_SOLVERS",
        "GUIDED_BRANCHES",
        "TARGET_SUM_TOLERANCE",
        "MID_BLOCK_SITE",
    ],
)
def test_the_copied_constants_are_the_pipelines(name):
    assert getattr(preflight, name) == getattr(pba, name)


def test_the_path_rule_is_the_pipelines_word_for_word():
    def tree(function):
        definition = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        return [ast.dump(statement) for statement in definition.body] + [ast.dump(definition.args)]

    assert tree(preflight.looks_like_local_path) == tree(pba.looks_like_local_path)


def test_the_dtype_names_are_the_loaders_and_the_stores():
    from h_classifiers.evaluation import DTYPES
    from h_classifiers.feature_store import STORAGE_DTYPES

    assert list(preflight.DTYPE_NAMES) == list(DTYPES)
    assert list(preflight.STORAGE_DTYPE_NAMES) == list(STORAGE_DTYPES)


# ---------------------------------------------------------------------------------------------------------------
# h's shape from the files is the pipeline's
# ---------------------------------------------------------------------------------------------------------------


def unet_folders(tmp_path):
    """The committed toy models, and unet configs of other sizes (an odd sample size: the sizes round up)."""
    from diffusers import UNet2DModel

    folders = list(TOY_MODELS)
    for size in (30, 17):
        folder = tmp_path / f"ddpm-{size}"
        config = dict(UNet2DModel.load_config(TOY_DDPM_PATH / "unet"), sample_size=size)
        UNet2DModel.from_config(config).save_config(folder / "unet")
        folders.append(folder)
    return folders


def test_the_h_shape_read_from_the_files_is_the_pipelines(tmp_path):
    from diffusers import UNet2DConditionModel, UNet2DModel

    for folder in unet_folders(tmp_path):
        config = json.loads((folder / "unet" / "config.json").read_text())
        unet_class = UNet2DModel if config["_class_name"] == "UNet2DModel" else UNet2DConditionModel
        unet = unet_class.from_config(config)
        size = config["sample_size"]
        assert preflight.unet_h_shape(folder) == pba.mid_block_h_shape(unet, size, size), folder


def test_the_h_shape_is_unknown_where_the_files_do_not_say(tmp_path):
    assert preflight.unet_h_shape("someone/some-model") is None
    assert preflight.unet_h_shape(tmp_path) is None
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "SomeOtherUNet"}))
    assert preflight.unet_h_shape(tmp_path) is None


def test_the_toy_models_classifiers_fit_them_and_not_the_others(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped classifier is shown relative to the working directory
    preflight.check_classifier_fits(SD_SKIN, TOY_MODEL_PATH)
    preflight.check_classifier_fits(DDPM_SKIN, TOY_DDPM_PATH)
    preflight.check_classifier_fits("someone/skin-classifier", TOY_DDPM_PATH)  # a Hub id: the pipeline checks
    with pytest.raises(ValueError) as info:
        preflight.check_classifier_fits(SD_SKIN, TOY_DDPM_PATH)
    message = str(info.value)
    assert message.startswith("`--classifier`") and "`--model`" in message and "\n" not in message
    assert "[64, 4, 4]" in message and "[128, 4, 4]" in message
    assert message.endswith("(its shipped skin classifier: h_classifiers/assets/classifiers/toy-ddpm/skin).")


def test_a_classifier_of_a_removed_guidance_site_is_refused(tmp_path):
    config = json.loads((SD_SKIN / "config.json").read_text()) | {"site": "up_blocks.0"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="reads h at site 'up_blocks.0'; only 'mid_block' is supported"):
        preflight.check_classifier_fits(tmp_path, TOY_MODEL_PATH)


# ---------------------------------------------------------------------------------------------------------------
# Models that are not there
# ---------------------------------------------------------------------------------------------------------------


def test_a_model_that_is_not_there_is_named_with_what_is_expected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for model, what in [(tmp_path / "missing-ddpm", "does not exist"), ("empty", "has no model_index.json")]:
        with pytest.raises(FileNotFoundError) as info:
            preflight.check_model_path(str(model))
        assert f"`--model` {str(model)!r} {what}" in str(info.value)
        assert "DDPMPipeline" in str(info.value) and "Stable Diffusion" in str(info.value)
    with pytest.raises(FileNotFoundError, match="is a file"):
        preflight.check_model_path("file")
    preflight.check_model_path("google/ddpm-celebahq-256")  # a Hub id: its loading says what is wrong
    preflight.check_model_path(TOY_DDPM_PATH)


def test_the_library_says_a_missing_model_does_not_exist_whatever_its_kind(tmp_path):
    """It said "is not a diffusers Stable Diffusion directory", also of a missing unconditional model."""
    from h_classifiers.evaluation import load_pipeline

    with pytest.raises(FileNotFoundError) as info:
        load_pipeline(tmp_path / "my-ddpm")
    assert "does not exist" in str(info.value) and "DDIMPipeline / DDPMPipeline" in str(info.value)
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        load_pipeline(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# On the command line: one line, exit 2, nothing heavy imported
# ---------------------------------------------------------------------------------------------------------------

EARLY_ERRORS = [
    (["generate", "--classifier", "./missing-classifier"], "`--classifier` './missing-classifier' does not exist"),
    (["evaluate", "--classifier", "./missing-classifier"], "`--classifier` './missing-classifier' does not exist"),
    (["generate", "--model", "./missing-ddpm"], "`--model` './missing-ddpm' does not exist"),
    (["generate", "--model", "./missing-ddpm", "--eta", "1"], "`--model` './missing-ddpm' does not exist"),
    (["evaluate", "--model", str(TOY_DDPM_PATH), "--classifier", str(SD_SKIN)], "was trained on h of shape"),
    (["generate", "--model", str(TOY_DDPM_PATH), "--classifier", str(SD_SKIN)], "was trained on h of shape"),
    (["generate", "--labeller", "toy:age"], "`--labeller` 'toy:age'"),
    (["generate", "--labeller", "oracle"], "`--labeller` must be 'auto', 'none', 'toy:ATTRIBUTE'"),
    (["extract", "--output-dir", "o", "--image-dir", "./missing-dir"], "`--image-dir` './missing-dir' is not a"),
    (["extract", "--output-dir", "o", "--prompt", "a", "--num-images", "2", "--labeller", "toy:age"], "'toy:age'"),
]


def test_early_errors_import_neither_torch_nor_diffusers(tmp_path):
    """Each is one argparse line (exit 2) given before torch, diffusers or the pipeline is imported: answered at
    once, where `generate --classifier <missing path>` took 5 s of imports. A fresh interpreter, so that nothing
    another test imported counts."""
    code = textwrap.dedent(
        f"""
        import sys
        from h_classifiers import cli
        for argv in {[argv for argv, _ in EARLY_ERRORS]!r}:
            try:
                cli.main(argv)
            except SystemExit as exit:
                assert exit.code == 2, (argv, exit.code)
            else:
                raise AssertionError(argv)
            heavy = [m for m in ('torch', 'diffusers', 'transformers', 'pipeline_balancing_act') if m in sys.modules]
            assert not heavy, (argv, heavy)
        print('checked', len({[argv for argv, _ in EARLY_ERRORS]!r}))
        """
    )
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checked {len(EARLY_ERRORS)}" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("balancing-act ")]
    assert len(errors) == len(EARLY_ERRORS), result.stderr[-3000:]
    for (argv, fragment), line in zip(EARLY_ERRORS, errors):
        assert line.startswith(f"balancing-act {argv[0]}: error: ") and fragment in line, (argv, line)
    assert "Traceback" not in result.stderr


def test_train_checks_its_folders_before_the_pipeline_is_imported(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    (features / "manifest.json").write_text("{}")
    (tmp_path / "clf").mkdir()
    runs = [
        (
            ["--features-dir", str(tmp_path / "none")],
            "`--features-dir` {!r} does not exist".format(str(tmp_path / "none")),
        ),
        (["--features-dir", str(tmp_path)], "has no manifest.json"),
        (["--features-dir", str(features), "--output-dir", str(tmp_path / "clf")], "pass `--overwrite` to replace it"),
    ]
    code = textwrap.dedent(
        f"""
        import sys
        from h_classifiers import cli
        for argv in {[argv for argv, _ in runs]!r}:
            argv = ['train', '--output-dir', {str(tmp_path / "out")!r}] + argv
            try:
                cli.main(argv)
            except SystemExit as exit:
                assert exit.code == 2, (argv, exit.code)
            assert not [m for m in ('diffusers', 'pipeline_balancing_act') if m in sys.modules], argv
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("balancing-act train: error: ")]
    assert [fragment in line for (_, fragment), line in zip(runs, errors)] == [True] * len(runs), result.stderr


def test_a_classifier_of_another_model_as_a_process_is_one_line_and_exit_2():
    """It was a 30-line traceback naming the Python argument `h_classifier`, exit 1."""
    argv = ["generate", "--model", str(TOY_DDPM_PATH), "--classifier", str(SD_SKIN)]
    result = subprocess.run(
        [sys.executable, "-m", "h_classifiers.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("balancing-act generate: error: `--classifier`") and "`h_classifier`" not in last


def test_the_pipelines_own_shape_check_is_reworded_to_the_option(tmp_path, monkeypatch, capsys):
    """Where the files could not tell (here: the early check skipped), the pipeline's refusal at its first call is
    still one argparse line naming `--classifier`, exit 2."""
    monkeypatch.setattr(preflight, "check_classifier_fits", lambda *args, **kwargs: None)
    argv = ["generate", "--model", str(TOY_DDPM_PATH), "--classifier", str(SD_SKIN), "--num-images", "2"]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--steps", "1", "--output-dir", str(tmp_path), "--no-progress"])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("balancing-act generate: error: `--classifier` 'skin' was trained on h of shape [64, 4, 4]")
    assert "`h_classifier`" not in last


def test_only_the_pipelines_input_errors_become_argument_errors():
    import argparse

    from h_classifiers.commands._errors import pipeline_input_errors

    parser = argparse.ArgumentParser(prog="p")
    with pytest.raises(SystemExit):
        with pipeline_input_errors(parser):
            raise ValueError("`guidance_strength` must be from 0 to 50; got 60.")
    for error in (ValueError("cannot reshape array"), RuntimeError("`h_classifier` broke"), KeyError("x")):
        with pytest.raises(type(error)):
            with pipeline_input_errors(parser):
                raise error
