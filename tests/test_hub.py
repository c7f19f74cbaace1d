"""Pushing a classifier to the Hub: everything up to the huggingface_hub calls (patched; no network)."""

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


@pytest.fixture
def fake_hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub.huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(hub.huggingface_hub, "upload_folder", fake.upload_folder)
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
