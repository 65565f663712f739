"""hub.py and train.py --push_to_hub, with the Hub client replaced in this process (nothing here reaches the Hub):
the finished folder is uploaded once, after it is complete; Trainer never pushes; a failed run uploads nothing; a
failed push is one line and keeps the adapter."""

import json
import os
from types import SimpleNamespace

import pytest

import hub
import train
from helpers import adapter_copy, train_argv
from model import check_adapter
from run_io import UserError


class FakeHub:
    """huggingface_hub.HfApi's methods hub.py calls: records each call; upload_folder reads the files it would send,
    chosen by huggingface_hub's own filter (the one upload_folder applies to allow_patterns)."""

    calls = []
    fail = None  # the method name that raises

    def __init__(self, token=None):
        self.token = token

    def _call(self, name, **kw):
        FakeHub.calls.append((name, {"token": self.token, **kw}))
        if FakeHub.fail == name:
            raise ConnectionError("the Hub is unreachable")

    def whoami(self):
        self._call("whoami")
        return {"name": "tester"}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self._call("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, revision=None, commit_message=None):
        from huggingface_hub.utils import filter_repo_objects

        every = [
            os.path.relpath(os.path.join(root, name), folder_path)
            for root, _, names in os.walk(folder_path)
            for name in names
        ]
        sent = {}
        for name in filter_repo_objects(every, allow_patterns=allow_patterns):
            with open(os.path.join(folder_path, name), "rb") as f:
                sent[name] = f.read()
        self._call("upload_folder", repo_id=repo_id, files=sent, revision=revision)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.trainer

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(hub, "HfApi", FakeHub)

    def trainer_pushes(*args, **kwargs):
        raise AssertionError("Trainer itself pushed to the Hub")

    # how Trainer reaches the Hub: hf_api() in transformers 5.25, create_repo and upload_folder in 5.9
    names = [n for n in ("hf_api", "create_repo", "upload_folder") if hasattr(transformers.trainer, n)]
    assert names, "transformers.trainer reaches the Hub by a name this fixture does not replace"
    for name in names:
        monkeypatch.setattr(transformers.trainer, name, trainer_pushes)
    return FakeHub


def _names(calls):
    return [name for name, _ in calls]


def _push_argv(tiny_assets, tmp_path, *extra):
    return [
        *train_argv(tiny_assets, tmp_path / "adapter", tmp_path / "cache"),
        "--push_to_hub",
        "--hub_model_id",
        "blip-lora-pets",
        "--hub_token",
        "hf_secret_token",
        *extra,
    ]


def test_push_uploads_the_finished_folder_once(tiny_assets, tmp_path, fake_hub, capsys):
    out = tmp_path / "adapter"
    train.main(_push_argv(tiny_assets, tmp_path, "--hub_private_repo", "True", "--hub_revision", "v1"))
    assert _names(fake_hub.calls) == ["whoami", "create_repo", "upload_folder"]
    (_, login), (_, created), (_, upload) = fake_hub.calls
    assert login["token"] == created["token"] == upload["token"] == "hf_secret_token"
    assert created == {
        "token": "hf_secret_token",
        "repo_id": "tester/blip-lora-pets",
        "private": True,
        "exist_ok": True,
    }
    assert upload["repo_id"] == "tester/blip-lora-pets" and upload["revision"] == "v1"
    # exactly what train.py left: every file of the folder but its checkpoints and its own bookkeeping
    left = {
        name: (out / name).read_bytes()
        for name in os.listdir(out)
        if not name.startswith((".", "checkpoint-")) and (out / name).is_file()
    }
    assert os.path.isdir(out / "checkpoint-2") and {"adapter_model.safetensors", "README.md"} <= set(left)
    assert upload["files"] == left
    card = upload["files"]["README.md"].decode()
    assert 'adapter = "tester/blip-lora-pets"' in card
    assert all(b"hf_secret_token" not in data for data in upload["files"].values())  # the token stays home
    record = json.loads(upload["files"]["run_config.json"])
    assert record["train"]["hub_model_id"] == "tester/blip-lora-pets" and record["train"]["push_to_hub"] is True
    assert "Pushed to https://huggingface.co/tester/blip-lora-pets/commit/0" in capsys.readouterr().out


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), UserError("the loss became nan at step 1")])
def test_a_failed_or_interrupted_run_pushes_nothing(stop, tiny_assets, tmp_path, fake_hub, monkeypatch):
    def train_and_stop(self, *a, **kw):
        raise stop

    monkeypatch.setattr(train.PetTrainer, "train", train_and_stop)
    with pytest.raises(type(stop)):
        train.main(_push_argv(tiny_assets, tmp_path))
    assert _names(fake_hub.calls) == ["whoami"]  # the login was checked first, nothing was created or sent


def test_a_failed_push_is_one_line_and_keeps_the_adapter(tiny_adapter, tmp_path, fake_hub):
    folder = adapter_copy(tiny_adapter, tmp_path)
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    fake_hub.fail = "upload_folder"
    args = SimpleNamespace(hub_token=None, hub_model_id="tester/pets", hub_private_repo=None, hub_revision=None)
    with pytest.raises(UserError) as caught:
        hub.push_folder(folder, sorted(before), args)
    message = str(caught.value)
    assert "\n" not in message and f"saved in {folder}/" in message
    assert "tester/pets failed (ConnectionError: the Hub is unreachable)" in message
    assert f"hf upload tester/pets {folder}" in message
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before
    check_adapter(folder)


def test_a_refused_login_stops_before_training(tiny_assets, tmp_path, fake_hub):
    fake_hub.fail = "whoami"
    with pytest.raises(UserError, match="--push_to_hub: the Hub does not accept this login.*hf auth login"):
        train.parse_args(_push_argv(tiny_assets, tmp_path))
    assert not os.path.exists(tmp_path / "adapter")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hub_strategy", "checkpoint"], "--hub_strategy checkpoint pushes Trainer's checkpoints"),
        (["--hub_model_id", "me/bad name"], "is not a Hub repo id"),
    ],
)
def test_hub_options_train_py_cannot_honour_are_one_line(extra, message, tiny_assets, tmp_path, fake_hub):
    with pytest.raises(UserError, match=message):
        train.parse_args(_push_argv(tiny_assets, tmp_path, *extra))


def test_a_hub_model_id_with_its_owner_is_used_as_given(fake_hub):
    args = SimpleNamespace(hub_token=None, hub_model_id="my-org/pets", output_dir="outputs/x")
    assert hub.hub_repo_id(args) == "my-org/pets"
    args.hub_model_id = None  # Trainer's default: the output folder's name, under the token's user
    assert hub.hub_repo_id(args) == "tester/x"
