"""`balancing-act` dispatch, help, and the clear errors of the generating commands for bad arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_classifier as make_tiny_classifier

from h_classifiers import HClassifier, cli


ROOT = Path(__file__).resolve().parent.parent
ALL_COMMANDS = ["generate", "extract", "train", "evaluate", "push"]


@pytest.fixture
def tiny_classifier(tmp_path):
    """A loadable skin classifier (light, dark) for the tests of argument errors."""
    path = tmp_path / "clf"
    make_tiny_classifier().save_pretrained(path)
    return str(path)


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert list(cli.COMMANDS) == ALL_COMMANDS
    for name in ALL_COMMANDS:
        assert f"  {name} " in out


def test_no_arguments_prints_usage(capsys):
    cli.main([])
    assert "usage: balancing-act <command>" in capsys.readouterr().out


def test_unknown_command_is_a_clear_error():
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert "unknown command 'frobnicate'" in str(info.value) and "generate" in str(info.value)


def test_command_whose_module_is_missing_says_so(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "not-built-yet", "a command without a module")
    with pytest.raises(SystemExit) as info:
        cli.main(["not-built-yet"])
    assert "not available" in str(info.value) and "h_classifiers.commands.not_built_yet" in str(info.value)


def test_dispatch_passes_the_remaining_arguments(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "load_command", lambda name: lambda argv: seen.update(name=name, argv=argv))
    cli.main(["generate", "--num-images", "4"])
    assert seen == {"name": "generate", "argv": ["--num-images", "4"]}


@pytest.mark.parametrize("command", ["generate", "evaluate", "extract", "train", "push"])
def test_command_help_goes_through_the_cli(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"balancing-act {command}" in capsys.readouterr().out


def test_bad_target_is_refused_before_loading_the_model(tiny_classifier, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["generate", "--classifier", tiny_classifier, "--model", str(tmp_path / "nowhere"), "--target", "0.5,0.6"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--target" in err and "sums to 1.1" in err and "'uniform'" in err


def test_target_with_the_wrong_number_of_classes(tiny_classifier, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--classifier", tiny_classifier, "--target", "0.2,0.3,0.5"])
    assert "3 values but there are 2 classes" in capsys.readouterr().err


def test_unknown_scheduler_lists_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--scheduler", "heun"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--scheduler" in err and "'heun'" in err and "dpm++" in err and "euler_a" in err


@pytest.mark.parametrize(
    "argv, fragment", [(["--num-images", "0"], "--num-images"), (["--strength", "-1"], "--strength")]
)
def test_bad_numbers_are_refused(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", *argv])
    assert fragment in capsys.readouterr().err


def test_missing_classifier_and_model_are_clear(tiny_classifier, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--classifier", str(tmp_path / "missing-classifier")])
    assert "missing-classifier" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--classifier", tiny_classifier, "--model", str(tmp_path / "missing-model")])
    err = capsys.readouterr().err
    assert "missing-model" in err and "model_index.json" in err


def test_reproduce_rejects_unknown_rows(capsys):
    from lab.reproduce import cli as reproduce

    with pytest.raises(SystemExit):
        reproduce.main(["--rows", "skin-50-50,skin-99-1"])
    assert "--rows" in capsys.readouterr().err


def test_evaluate_rejects_unknown_configurations(tiny_classifier, capsys):
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--classifier", tiny_classifier, "--configurations", "vanilla,magic"])
    assert "--configurations" in capsys.readouterr().err


def test_console_script_module_runs_as_a_process():
    out = subprocess.run(
        [sys.executable, "-m", "h_classifiers.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "generate" in out and "push" in out and "reproduce" not in out


def test_the_hit_rate_line_shows_the_strict_rate_beside_the_rate_over_valid_images():
    """Invalid images are left out of the hit rate; printing it alone read as 100 % while half the images missed."""
    import torch

    from h_classifiers.commands._common import format_summary
    from h_classifiers.evaluation import summarize_labels

    summary = summarize_labels(torch.tensor([0, -1, 1, -1]), [0.5, 0.5], asked=[0, 0, 1, 1]) | {"seconds": 1.0}
    line = format_summary("sample", summary, ["light", "dark"])
    assert "asked-class hit 100.0% of valid, 50.0% strict" in line


@pytest.mark.parametrize("path", ["./nope", "nope/", "some/dir/that/does/not/exist", "outputs/skin", "nope"])
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_missing_local_classifier_fails_at_once(command, path, tmp_path, monkeypatch, capsys):
    """No model loaded, no Hub lookup: one line saying the path does not exist."""
    from h_classifiers.commands import _common

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded something before checking the classifier path")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/skin`: its parent exists here, so it is a local path
    monkeypatch.setattr(HClassifier, "from_pretrained", must_not_run)
    monkeypatch.setattr(_common, "quiet_loading", must_not_run)
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--classifier", path])
    assert info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            f"error: `--classifier` {path!r} does not exist (expected a directory written by `balancing-act train` / "
            "`HClassifier.save_pretrained`, or a Hub id 'user/name')."
        )
    )


def test_hub_ids_and_existing_folders_pass_the_local_path_check(tiny_classifier, tmp_path, monkeypatch):
    from h_classifiers.commands._common import check_classifier_path
    from pipeline_balancing_act import looks_like_local_path as looks_local

    monkeypatch.chdir(tmp_path)
    for hub_id in ("someone/skin-h-classifier", "org/name"):
        assert not looks_local(hub_id)
        check_classifier_path(hub_id)
    check_classifier_path(tiny_classifier)
    assert looks_local("./x") and looks_local("x/") and looks_local("a/b/c") and looks_local(str(tmp_path / "x"))


class Loading(Exception):
    """Raised where a command would start loading models: the arguments passed the early checks."""


@pytest.fixture
def stop_before_loading(monkeypatch):
    from h_classifiers.commands import _common

    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(_common, "quiet_loading", loading)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--num-images", "1"],
        ["generate", "--num-images", "1", "--batch-size", "1"],
        ["evaluate", "--num-images", "1", "--configurations", "vanilla,distribution"],
    ],
)
def test_distribution_mode_with_one_image_is_an_argument_error(argv, stop_before_loading, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("error: distribution mode needs --num-images >= 2 (a distribution "
                                                 "over 1 image means nothing); steer a single image with sample mode.")  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--num-images", "1", "--mode", "sample"],
        ["generate", "--num-images", "2", "--batch-size", "1"],
        ["evaluate", "--num-images", "1", "--configurations", "vanilla,sample"],
    ],
)
def test_other_image_counts_pass_the_early_check(argv, stop_before_loading):
    with pytest.raises(Loading):
        cli.main(argv)


# Each command's required arguments, so that its parser can be run on one option at a time.
REQUIRED_ARGUMENTS = {
    "generate": [],
    "evaluate": [],
    "extract": ["--output-dir", "out"],
    "train": ["--features-dir", "feats", "--output-dir", "out"],
    "push": ["folder", "someone/repo"],
}


def command_parser(name):
    import importlib

    return importlib.import_module(f"h_classifiers.commands.{name}").build_parser()


@pytest.mark.parametrize("command", list(REQUIRED_ARGUMENTS))
def test_every_option_accepts_underscores_as_well_as_dashes(command):
    parser, required = command_parser(command), REQUIRED_ARGUMENTS[command]
    checked = 0
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--") and "-" in s[2:]]
        if not long:
            continue
        value = [] if action.nargs == 0 else [str(action.choices[0]) if action.choices else "2"]
        dashed = parser.parse_args(required + [long[0], *value])
        underscored = parser.parse_args(required + ["--" + long[0][2:].replace("-", "_"), *value])
        assert vars(dashed) == vars(underscored), long[0]
        checked += 1
    assert checked >= 1
    assert parser.parse_args(required + ["--output_dir=x" if command != "push" else "--commit_message=x"]) is not None


def test_generate_and_evaluate_take_underscored_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--num_images", "0"])
    assert "argument --num-images: expected a positive integer, got 0" in capsys.readouterr().err
    args = command_parser("evaluate").parse_args(["--num_images", "8", "--batch_size=4", "--no_progress"])
    assert (args.num_images, args.batch_size, args.no_progress) == (8, 4, True)
    args = command_parser("train").parse_args(REQUIRED_ARGUMENTS["train"] + ["--push_to_hub", "someone/x"])
    assert args.push_to_hub == "someone/x"


@pytest.mark.parametrize("command", list(REQUIRED_ARGUMENTS))
def test_every_help_text_shows_its_default(command):
    parser = command_parser(command)
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert "default" in formatter._get_help_string(action).lower(), action.option_strings
    text = parser.format_help()
    assert "(default: " in text and "Options also accept underscores" in text


HEAVY_MODULES = ("diffusers", "transformers", "matplotlib", "pipeline_balancing_act")


def test_help_and_argument_errors_import_no_heavy_module():
    """`balancing-act <command> --help` and an argument error print fast and without the torchvision warnings that
    importing diffusers / transformers prints: those are imported only once a command runs."""
    code = (
        "import sys\n"
        "from h_classifiers import cli\n"
        "runs = [[name, '--help'] for name in cli.COMMANDS]\n"
        "runs += [['generate', '--num-images', '0'], ['generate', '--num-images', '1'], ['evaluate', '--target'],\n"
        "         ['train', '--epochs', '0'], ['extract'], ['push'],\n"
        "         ['extract', '--output-dir', 'o', '--threads', '0']]\n"
        "for argv in runs:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), (argv, exit.code)\n"
        "    else:\n"
        "        raise AssertionError(argv)\n"
        f"print('HEAVY', sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stdout
    assert "torchvision" not in result.stderr and "Traceback" not in result.stderr


def test_generate_help_as_a_process_prints_no_warning():
    result = subprocess.run(
        [sys.executable, "-m", "h_classifiers.cli", "generate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--num-images" in result.stdout
    assert result.stderr == ""


# ---------------------------------------------------------------------------------------------------------------
# --target: negative-looking values, early checks against the classifier's classes, readable numbers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a classifier or starting the run is an error: the argument must be refused before."""
    from h_classifiers.commands import _common

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded something before checking the target")

    monkeypatch.setattr(HClassifier, "from_pretrained", must_not_run)
    monkeypatch.setattr(_common, "quiet_loading", must_not_run)


@pytest.mark.parametrize("form", [["--target", "-0.2,1.2"], ["--target=-0.2,1.2"], ["--target", "-.2,1.2"]])
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_negative_target_reaches_our_check_and_says_why(command, form, tiny_classifier, nothing_loads, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--classifier", tiny_classifier, *form])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "expected one argument" not in last
    assert "`--target`" in last and "probabilities must be non-negative" in last and "'uniform'" in last


def test_negative_values_of_other_options_still_parse():
    args = command_parser("generate").parse_args(["--seed", "-3", "--guidance-scale", "-1.5", "--target", "-1,2"])
    assert (args.seed, args.guidance_scale, args.target) == (-3, -1.5, "-1,2")
    with pytest.raises(SystemExit):  # a flag is still a flag: `-1` is not swallowed by an option that takes none
        command_parser("evaluate").parse_args(["--no-progress", "-1"])


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("0.2,0.3,0.5", "has 3 values but there are 2 classes"),  # needs the class names: read from config.json
        ("0.5,0.6", "sums to 1.1, not 1"),
        ("light,dark", "is not valid"),
    ],
)
def test_a_bad_target_is_refused_before_the_classifier_loads(target, fragment, tiny_classifier, nothing_loads, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--classifier", tiny_classifier, "--target", target])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert fragment in last and "['light', 'dark']" in last


def test_a_hub_classifier_target_is_checked_as_far_as_it_can_be_before_loading(nothing_loads, capsys):
    """A Hub id has no local config.json: the numbers are still checked before anything is downloaded."""
    with pytest.raises(SystemExit):
        cli.main(["generate", "--classifier", "someone/skin-classifier", "--target", "0.5,0.6"])
    assert "`--target` [0.5, 0.6] sums to 1.1, not 1" in capsys.readouterr().err


def test_a_good_target_passes_the_early_check(tiny_classifier, stop_before_loading):
    with pytest.raises(Loading):
        cli.main(["generate", "--classifier", tiny_classifier, "--target", "0.3,0.7"])


@pytest.mark.parametrize(
    "option, value, accepted",
    [("--guided-branches", "all", "['cond', 'both']"), ("--solver", "ot", "['assign', 'kl', 'chi2']")],
)
def test_guidance_choices_are_the_pipelines_and_checked_before_loading(option, value, accepted, nothing_loads, capsys):
    import pipeline_balancing_act as pba

    assert accepted in (str(list(pba.GUIDED_BRANCHES)), str(list(pba.DISTRIBUTION_SOLVERS)))
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", option, value])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: `{option}` must be one of {accepted}, got {value!r}.")


def test_run_time_argument_errors_as_a_process_print_one_line_and_no_third_party_notice():
    """These checks import the pipeline (its constants): the transformers torchvision notice must not show."""
    code = (
        "from h_classifiers import cli\n"
        "for argv in (['generate', '--classifier', './nope'], ['generate', '--target', '-0.2,1.2']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 2, (argv, exit.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if not line.startswith(("usage:", " "))]
    assert len(errors) == 2, result.stderr
    assert "'./nope' does not exist" in errors[0] and "probabilities must be non-negative" in errors[1]


def test_the_torchvision_notice_is_dropped_and_nothing_else():
    import logging

    from h_classifiers.commands._parser import silence_known_notices

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.utils.import_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        silence_known_notices()
        silence_known_notices()  # idempotent
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`.")
        logger.warning("some other warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other warning"]


def test_the_numpy_copy_warning_of_diffusers_schedulers_is_filtered_precisely():
    import warnings

    from h_classifiers.commands._parser import silence_known_notices

    message = "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_notices()
        warnings.warn_explicit(message, DeprecationWarning, "s.py", 1, module="diffusers.schedulers.scheduling_ddim")
        warnings.warn_explicit(message, DeprecationWarning, "m.py", 1, module="mymodule")
        warnings.warn_explicit("other", DeprecationWarning, "s.py", 2, module="diffusers.schedulers.scheduling_ddim")
    assert [(str(w.message), w.filename) for w in caught] == [(message, "m.py"), ("other", "s.py")]


# ---------------------------------------------------------------------------------------------------------------
# One thread policy for every command
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def thread_calls(monkeypatch):
    """Records torch.set_num_threads and stops each command right after its thread setting."""
    import torch

    import h_classifiers.distributed
    import h_classifiers.training
    from h_classifiers.commands import _common

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)

    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(_common, "quiet_loading", loading)  # generate, evaluate
    monkeypatch.setattr(h_classifiers.distributed, "process_state", loading)  # extract
    monkeypatch.setattr(h_classifiers.training, "train_classifier", loading)  # train
    return calls


def command_argv(command, model, tmp_path):
    """Each command on `model` (train: features extracted from it)."""
    import json

    if command in ("generate", "evaluate"):
        return [command, "--model", model, "--num-images", "4"]
    if command == "extract":
        return [command, "--model", model, "--output-dir", str(tmp_path / "h"), "--prompt", "a", "--num-images", "2"]
    features = tmp_path / "features"
    features.mkdir(exist_ok=True)
    (features / "manifest.json").write_text(json.dumps({"model": model}))
    return [command, "--features-dir", str(features), "--output-dir", str(tmp_path / "clf")]


@pytest.mark.parametrize("command", ["generate", "evaluate", "extract", "train"])
def test_every_command_has_the_same_thread_default(command, thread_calls, tmp_path):
    from h_classifiers.toy_world import TOY_MODEL_PATH

    other_model = tmp_path / "some-sd"
    other_model.mkdir()
    (other_model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    runs = [(str(TOY_MODEL_PATH), [], [1]), (str(other_model), [], []), (str(TOY_MODEL_PATH), ["--threads", "3"], [3])]
    for model, extra, expected in runs:
        thread_calls.clear()
        with pytest.raises(Loading):
            cli.main(command_argv(command, model, tmp_path) + extra)
        assert thread_calls == expected, (command, model, extra)


def test_every_command_states_the_same_thread_policy():
    names = ("generate", "evaluate", "extract", "train")
    texts = {name: command_parser(name)._option_string_actions["--threads"].help for name in names}
    assert len(set(texts.values())) == 1 and "toy model" in texts["extract"]


def test_a_strength_past_the_pipelines_bound_is_one_argument_error_before_loading(nothing_loads, capsys):
    import pipeline_balancing_act as pba

    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--strength", str(pba.MAX_GUIDANCE_STRENGTH * 2)])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: `--strength` must be from 0 to 50" in last


# ---------------------------------------------------------------------------------------------------------------
# Progress and what `--labeller auto` measures (the committed toy DDPM: fast, and a toy the oracle reads)
# ---------------------------------------------------------------------------------------------------------------


def toy_ddpm_argv(command, tmp_path, *extra):
    from h_classifiers.toy_world import TOY_DDPM_CLASSIFIERS_PATH, TOY_DDPM_PATH

    if not (TOY_DDPM_PATH / "model_index.json").exists():
        pytest.skip("the committed toy DDPM is missing")
    argv = [command, "--model", str(TOY_DDPM_PATH), "--classifier", str(TOY_DDPM_CLASSIFIERS_PATH / "skin")]
    return argv + ["--num-images", "2", "--batch-size", "2", "--steps", "2", "--output-dir", str(tmp_path), *extra]


def test_generate_takes_no_progress_and_auto_measures_the_toy_ddpm_with_the_oracle(tmp_path, capsys):
    cli.main(toy_ddpm_argv("generate", tmp_path / "quiet", "--no-progress"))
    report = json.loads((tmp_path / "quiet" / "generate_results.json").read_text())
    out, err = capsys.readouterr()
    assert "generate:" not in err  # no bar
    assert report["labeller"] == "toy_world.ToyOracle[skin]" and "No labeller" not in out
    assert set(report["results"]["vanilla"]) >= {"fractions", "valid_rate"}
    cli.main(toy_ddpm_argv("generate", tmp_path / "bar"))
    assert "generate: 100%" in capsys.readouterr().err  # the bar, without --no-progress


def test_auto_labeller_is_the_oracle_for_every_committed_toy_model_and_none_otherwise(tmp_path):
    from types import SimpleNamespace

    from h_classifiers.commands._common import build_labeller
    from h_classifiers.labellers import ToyOracleLabeller
    from h_classifiers.toy_world import TOY_DDPM_PATH, TOY_MODEL_PATH

    classifier = SimpleNamespace(config=SimpleNamespace(attribute="skin", class_names=["light", "dark"]))
    for model in (TOY_MODEL_PATH, TOY_DDPM_PATH):
        args = SimpleNamespace(model=str(model), labeller="auto", labeller_prompts=None)
        assert isinstance(build_labeller(args, classifier, "cpu"), ToyOracleLabeller), model
    args = SimpleNamespace(model=str(tmp_path), labeller="auto", labeller_prompts=None)
    assert build_labeller(args, classifier, "cpu") is None
    other = SimpleNamespace(config=SimpleNamespace(attribute="age", class_names=["young", "old"]))
    assert build_labeller(SimpleNamespace(model=str(TOY_DDPM_PATH), labeller="auto"), other, "cpu") is None


def test_evaluate_without_progress_prints_each_configuration_as_it_finishes(tmp_path, monkeypatch, capsys):
    """`--no-progress` printed nothing until every configuration was done (minutes on a real model)."""
    import h_classifiers.evaluation

    real, printed_before = h_classifiers.evaluation.run_configuration, {}

    def recording(pipe, classifier, spec, configuration, *args, **kwargs):
        printed_before[configuration] = capsys.readouterr().out
        print(printed_before[configuration], end="")  # keep it in the captured output
        return real(pipe, classifier, spec, configuration, *args, **kwargs)

    monkeypatch.setattr(h_classifiers.evaluation, "run_configuration", recording)
    argv = toy_ddpm_argv("evaluate", tmp_path, "--no-progress", "--configurations", "vanilla,sample,distribution")
    cli.main(argv + ["--labeller", "toy:skin"])
    out, err = capsys.readouterr()
    assert "vanilla " not in printed_before["vanilla"]
    assert "vanilla " in printed_before["sample"] and "sample " in printed_before["distribution"]
    measures = ("valid", "no labelled image")  # a configuration's line (the verdict's lines are indented)
    lines = [line.split()[0] for line in out.splitlines() if line[:1] != " " and any(m in line for m in measures)]
    assert lines == ["vanilla", "sample", "distribution"]  # each once, in order
    assert "evaluate:" not in err


def test_the_fractions_chart_of_an_unconditional_model_is_titled_with_its_name():
    from h_classifiers.evaluation import chart_title

    assert chart_title({"spec": {"prompt": None}, "model": "h_classifiers/assets/toy-ddpm"}) == (
        "toy-ddpm (unconditional, no prompt)"
    )
    assert chart_title({"spec": {"prompt": None}, "model": "google/ddpm-celebahq-256/"}).startswith(
        "ddpm-celebahq-256 "
    )
    assert chart_title({"spec": {"prompt": "a photo of a face"}, "model": "x"}) == "a photo of a face"
    assert chart_title({"spec": {"prompt": None}}) == "unconditional model (no prompt)"
