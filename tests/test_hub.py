"""Pushing a classifier or the pipeline file to the Hub: everything up to the huggingface_hub calls (patched; no
network)."""

from pathlib import Path

import pytest
import torch

from h_classifiers import hub
from h_classifiers.feature_store import create_store, finish_store, write_chunk


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs["repo_id"], kwargs))
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub.huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(hub.huggingface_hub, "upload_folder", fake.upload_folder)
    monkeypatch.setattr(hub.huggingface_hub, "upload_file", fake.upload_file)
    return fake


@pytest.fixture
def saved_classifier(tmp_path):
    from tiny_models import tiny_classifier

    path = tmp_path / "skin"
    tiny_classifier().save_pretrained(path)
    return path


def test_push_creates_the_repo_and_uploads_the_folder(fake_hub, saved_classifier):
    url = hub.push_classifier(saved_classifier, "someone/skin-classifier", token="hf_x", private=True)
    assert url == "https://huggingface.co/someone/skin-classifier"
    (name, repo, create), (name2, repo2, upload) = fake_hub.calls
    assert (name, repo, name2, repo2) == (
        "create_repo",
        "someone/skin-classifier",
        "upload_folder",
        "someone/skin-classifier",
    )
    assert create["exist_ok"] and create["private"] and create["token"] == "hf_x" and create["repo_type"] == "model"
    assert upload["folder_path"] == str(saved_classifier) and upload["token"] == "hf_x"
    assert "*.pt" in upload["ignore_patterns"]


def test_push_refuses_bad_input_before_any_call(fake_hub, saved_classifier, tmp_path):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        hub.push_classifier(saved_classifier, "bad repo id with spaces")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hub.push_classifier(tmp_path / "missing", "someone/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lacks \\['config.json', 'diffusion_pytorch_model.safetensors'\\]"):
        hub.push_classifier(tmp_path / "empty", "someone/x")
    assert fake_hub.calls == []


def test_push_command(fake_hub, saved_classifier, capsys):
    from h_classifiers.commands.push import main

    main([str(saved_classifier), "someone/skin", "--private", "--commit-message", "first"])
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["commit_message"] == "first" and fake_hub.calls[0][2]["private"] is True
    assert "Pushed" in capsys.readouterr().out


def test_train_push_to_hub_uploads_the_saved_folder(fake_hub, tmp_path):
    from h_classifiers.commands.train import main

    manifest = create_store(tmp_path / "feats", [801, 1], ["a", "b"], attribute="x")
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    h = torch.randn(2, 40, 2, 2, 2, generator=generator) + labels.view(1, 40, 1, 1, 1)
    finish_store(tmp_path / "feats", write_chunk(tmp_path / "feats", manifest, 0, {"cond": h}, labels))
    out = tmp_path / "clf"
    main(["--features-dir", str(tmp_path / "feats"), "--output-dir", str(out), "--epochs", "1", "--min-steps", "5",
          "--no-progress", "--push_to_hub", "someone/x-classifier"])  # fmt: skip
    assert [c[:2] for c in fake_hub.calls] == [
        ("create_repo", "someone/x-classifier"),
        ("upload_folder", "someone/x-classifier"),
    ]
    assert fake_hub.calls[1][2]["folder_path"] == str(out) and (out / "README.md").is_file()


def test_train_rejects_a_bad_repo_id_before_training(fake_hub, tmp_path, capsys):
    from h_classifiers.commands.train import main

    with pytest.raises(SystemExit):
        main(["--features-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "clf"), "--push_to_hub", "a b"])
    assert "not a valid Hub repo id" in capsys.readouterr().err and fake_hub.calls == []


def connect_error():
    """The error huggingface_hub's HTTP client raises without a network (httpx, or its fork httpx2)."""
    import sys

    import huggingface_hub.utils._http  # noqa: F401  (loads the client module)

    client = sys.modules.get("httpx2") or sys.modules.get("httpx")
    return client.ConnectError("[Errno -3] Temporary failure in name resolution")


def test_push_without_network_ends_in_one_line(saved_classifier, monkeypatch):
    from h_classifiers.commands.push import main

    def unreachable(*args, **kwargs):
        raise connect_error()

    monkeypatch.setattr(hub.huggingface_hub, "create_repo", unreachable)
    with pytest.raises(SystemExit) as info:
        main([str(saved_classifier), "someone/skin"])
    message = str(info.value.code)
    assert "\n" not in message
    assert message.startswith(
        "balancing-act push: the Hugging Face Hub is unreachable, nothing was pushed to 'someone/skin'"
    )
    assert "Temporary failure in name resolution" in message


def test_push_in_offline_mode_ends_in_one_line(saved_classifier, monkeypatch):
    """The real huggingface_hub call, offline: it refuses before any connection, and that is one line too."""
    import huggingface_hub.constants

    from h_classifiers.commands.push import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as info:
        main([str(saved_classifier), "someone/skin", "--token", "hf_not_used"])
    assert "\n" not in str(info.value.code) and "the Hugging Face Hub is unreachable" in str(info.value.code)


def test_train_says_the_classifier_is_saved_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    from h_classifiers.commands.train import main

    def unreachable(*args, **kwargs):
        raise connect_error()

    monkeypatch.setattr(hub.huggingface_hub, "create_repo", unreachable)
    manifest = create_store(tmp_path / "feats", [801, 1], ["a", "b"], attribute="x")
    labels = torch.arange(20) % 2
    h = torch.randn(2, 20, 2, 2, 2, generator=torch.Generator().manual_seed(0)) + labels.view(1, 20, 1, 1, 1)
    finish_store(tmp_path / "feats", write_chunk(tmp_path / "feats", manifest, 0, {"cond": h}, labels))
    with pytest.raises(SystemExit) as info:
        main(["--features-dir", str(tmp_path / "feats"), "--output-dir", str(tmp_path / "clf"), "--epochs", "1",
              "--min-steps", "2", "--no-progress", "--push-to-hub", "someone/x"])  # fmt: skip
    message = str(info.value.code)
    assert (
        "\n" not in message and f"the classifier is saved in {tmp_path / 'clf'}, but the Hugging Face Hub" in message
    )
    assert (tmp_path / "clf" / "config.json").is_file()


def test_push_pipeline_uploads_the_pipeline_file_as_pipeline_py(fake_hub):
    from tiny_models import ROOT

    url = hub.push_pipeline("someone/balancing-act", token="hf_x")
    assert url == "https://huggingface.co/someone/balancing-act"
    (name, repo, create), (name2, repo2, upload) = fake_hub.calls
    assert (name, repo, name2, repo2) == (
        "create_repo",
        "someone/balancing-act",
        "upload_file",
        "someone/balancing-act",
    )
    assert create["exist_ok"] and create["repo_type"] == "model" and create["token"] == "hf_x"
    # diffusers loads `custom_pipeline="user/repo"` from the repo's `pipeline.py`
    assert upload["path_in_repo"] == "pipeline.py" and upload["repo_type"] == "model" and upload["token"] == "hf_x"
    assert Path(upload["path_or_fileobj"]).resolve() == (ROOT / "pipeline_balancing_act.py").resolve()


def test_push_unconditional_pipeline_uploads_the_core_beside_it(fake_hub, capsys):
    from tiny_models import ROOT

    from h_classifiers.commands.push import main

    main(["--pipeline", "someone/ddpm-balanced", "--unconditional"])
    uploads = [call[2] for call in fake_hub.calls if call[0] == "upload_file"]
    assert [(Path(u["path_or_fileobj"]).resolve(), u["path_in_repo"]) for u in uploads] == [
        ((ROOT / "pipeline_balancing_act.py").resolve(), "pipeline_balancing_act.py"),  # imported by pipeline.py
        ((ROOT / "pipeline_balancing_act_unconditional.py").resolve(), "pipeline.py"),
    ]
    with pytest.raises(SystemExit):
        main(["some-folder", "someone/x", "--unconditional"])
    assert "--unconditional goes with --pipeline" in capsys.readouterr().err


def test_push_xl_pipeline_uploads_the_core_beside_it(fake_hub, capsys):
    from tiny_models import ROOT

    from h_classifiers.commands.push import main

    main(["--pipeline", "someone/sdxl-balanced", "--xl"])
    assert [c[:2] for c in fake_hub.calls] == [("create_repo", "someone/sdxl-balanced")] + [
        ("upload_file", "someone/sdxl-balanced")
    ] * 2
    uploads = [call[2] for call in fake_hub.calls if call[0] == "upload_file"]
    assert [(Path(u["path_or_fileobj"]).resolve(), u["path_in_repo"]) for u in uploads] == [
        ((ROOT / "pipeline_balancing_act.py").resolve(), "pipeline_balancing_act.py"),  # imported by pipeline.py
        ((ROOT / "pipeline_balancing_act_xl.py").resolve(), "pipeline.py"),
    ]
    assert 'custom_pipeline="someone/sdxl-balanced", trust_remote_code=True' in capsys.readouterr().out
    fake_hub.calls.clear()
    for argv, message in [
        (["some-folder", "someone/x", "--xl"], "--xl goes with --pipeline"),
        (["--pipeline", "someone/x", "--xl", "--unconditional"], "--unconditional and --xl name two pipelines"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="name two pipelines"):
        hub.push_pipeline("someone/x", unconditional=True, xl=True)
    assert fake_hub.calls == []


def test_push_pipeline_refuses_bad_input_before_any_call(fake_hub, tmp_path):
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        hub.push_pipeline("bad repo id")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        hub.push_pipeline("someone/x", file=tmp_path / "missing.py")
    assert fake_hub.calls == []


def test_push_command_with_pipeline_only(fake_hub, capsys):
    from h_classifiers.commands.push import main

    main(["--pipeline", "someone/balancing-act", "--private"])
    assert [c[:2] for c in fake_hub.calls] == [
        ("create_repo", "someone/balancing-act"),
        ("upload_file", "someone/balancing-act"),
    ]
    assert fake_hub.calls[0][2]["private"] is True and fake_hub.calls[1][2]["path_in_repo"] == "pipeline.py"
    assert 'custom_pipeline="someone/balancing-act", trust_remote_code=True' in capsys.readouterr().out


def test_push_command_with_classifier_and_pipeline(fake_hub, saved_classifier):
    from h_classifiers.commands.push import main

    main([str(saved_classifier), "someone/skin", "--pipeline", "someone/skin"])
    assert [c[:2] for c in fake_hub.calls] == [
        ("create_repo", "someone/skin"),
        ("upload_folder", "someone/skin"),
        ("create_repo", "someone/skin"),
        ("upload_file", "someone/skin"),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to push"),
        (["folder-only"], "give both FOLDER and REPO_ID"),
        (["--pipeline", "bad id"], "not a valid Hub repo id"),
    ],
)
def test_push_command_refuses_incomplete_arguments_before_any_call(fake_hub, saved_classifier, capsys, argv, message):
    from h_classifiers.commands.push import main

    if argv[:1] == ["--pipeline"]:  # a bad pipeline repo id stops the classifier's push too
        argv = [str(saved_classifier), "someone/skin", *argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err and fake_hub.calls == []


def test_push_help_names_only_its_own_options(capsys):
    from h_classifiers.commands.push import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--pipeline" in text and "--num_images" not in text and "--num-images" not in text
    assert text.rstrip().endswith("--commit_message is --commit-message.")


def test_push_pipeline_without_network_ends_in_one_line(monkeypatch):
    from h_classifiers.commands.push import main

    def unreachable(*args, **kwargs):
        raise connect_error()

    monkeypatch.setattr(hub.huggingface_hub, "create_repo", unreachable)
    with pytest.raises(SystemExit) as info:
        main(["--pipeline", "someone/balancing-act"])
    message = str(info.value.code)
    assert "\n" not in message and message.startswith(
        "balancing-act push: the Hugging Face Hub is unreachable, nothing was pushed to 'someone/balancing-act'"
    )
