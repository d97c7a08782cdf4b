"""`llmclf export RUN --output DIR --push-to-hub REPO`: the exported folder is uploaded with
`HfApi().upload_folder` (repository created if missing); offline, without a token or with the hub out of
reach, a clear error within seconds naming the repository and what to do, the exported folder kept."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from llmclf.cli import main
from llmclf.cli.commands import push_to_hub
from llmclf.errors import LlmclfError
from llmclf.model import sources

REPO = "someone/news-classifier"
EXPORTED = ("config.json", "model.safetensors", "README.md", "tokenizer_config.json", "tokenizer.json")


@pytest.fixture
def online(monkeypatch):
    """A token and no offline mode (the suite sets HF_HUB_OFFLINE=1), nothing reaching the real hub."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_0123456789")


class FakeApi:
    """Records what llmclf asks of the hub, and what the folder held when it was uploaded."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_push_uploads_the_exported_folder(trained_run, tmp_path, online, monkeypatch, capsys):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(sources, "_answers", lambda *args: True)  # the probe of the hub's host
    out = tmp_path / "merged"
    argv = ["export", str(trained_run), "--output", str(out), "--push-to-hub", REPO, "--private"]
    assert main(argv) == 0
    (create, created), (upload, uploaded) = FakeApi.calls
    assert create == "create_repo" and created == {"repo_id": REPO, "private": True, "exist_ok": True}
    assert upload == "upload_folder"
    assert uploaded["repo_id"] == REPO and Path(uploaded["folder_path"]) == out
    assert set(EXPORTED) <= set(uploaded["files"])  # written before the upload
    assert f"Uploaded to https://huggingface.co/{REPO}" in capsys.readouterr().out
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f'model="{REPO}"' in card and "- name: news-classifier" in card

    FakeApi.calls = []  # without --private: the hub's default visibility
    assert (
        main(["--quiet", "export", str(trained_run), "--output", str(tmp_path / "b"), "--push-to-hub", REPO])
        == 0
    )
    assert FakeApi.calls[0][1]["private"] is None


def test_an_unreachable_hub_fails_fast_and_keeps_the_folder(
    trained_run, tmp_path, online, monkeypatch, capsys
):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # as HF_ENDPOINT=http://127.0.0.1:9
    out = tmp_path / "merged"
    assert main(["export", str(trained_run), "--output", str(out), "--push-to-hub", REPO]) == 2
    err = capsys.readouterr().err
    assert f"Could not push to the hub repository {REPO}" in err
    assert "127.0.0.1 cannot be reached" in err and f"kept in {out}" in err and f"hf upload {REPO}" in err
    assert all((out / name).is_file() for name in EXPORTED)

    # The same with the probe passed (as behind a proxy): the real HfApi fails, in seconds.
    monkeypatch.setattr(sources, "_answers", lambda *args: True)
    started = time.monotonic()
    with pytest.raises(LlmclfError, match=r"someone/news-classifier: the upload failed \(Connect"):
        push_to_hub(out, REPO)
    assert time.monotonic() - started < 10


def test_without_a_token_or_offline_the_error_says_what_to_do(tmp_path, online, monkeypatch):
    folder = tmp_path / "merged"
    folder.mkdir()
    monkeypatch.setattr(sources, "_answers", lambda *args: pytest.fail("no probe is needed"))
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    started = time.monotonic()
    with pytest.raises(LlmclfError) as missing:
        push_to_hub(folder, REPO)
    message = str(missing.value)
    assert REPO in message and "no Hugging Face token" in message
    assert "HF_TOKEN" in message and "hf auth login" in message and "huggingface-cli login" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LlmclfError, match=f"{REPO}: HF_HUB_OFFLINE is set"):
        push_to_hub(folder, REPO)
    assert time.monotonic() - started < 5


def test_a_refused_token_and_a_bad_repo_id(trained_run, tmp_path, online, monkeypatch, capsys):
    class Refused(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            response = httpx.Response(
                401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create")
            )
            raise HfHubHTTPError("401 Unauthorized", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", Refused)
    monkeypatch.setattr(sources, "_answers", lambda *args: True)
    folder = tmp_path / "merged"
    folder.mkdir()
    with pytest.raises(LlmclfError, match="refused the token \\(401\\); set HF_TOKEN"):
        push_to_hub(folder, REPO)

    # A repository id the hub would refuse is an error before anything is exported.
    out = tmp_path / "never"
    assert main(["export", str(trained_run), "--output", str(out), "--push-to-hub", "not a/repo id"]) == 2
    assert "is not a Hugging Face repository id" in capsys.readouterr().err
    assert not out.exists()
