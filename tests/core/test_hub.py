"""jaxdiff.hub: local folders, Hub repo ids through huggingface_hub's cache, offline errors."""

import pytest

from jaxdiff import hub


def test_local_folder_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert hub.resolve_file(tmp_path, "config.json", "unet") == str(
        tmp_path / "unet" / "config.json"
    )


def test_local_missing_file_names_file_and_contents(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "other.txt").write_text("")
    with pytest.raises(hub.HubFileNotFoundError, match=r"'config.json' not found.*other.txt"):
        hub.resolve_file(tmp_path, "config.json", "unet")
    assert hub.resolve_file(tmp_path, "config.json", "unet", required=False) is None


def test_missing_local_path_is_not_a_repo_id(tmp_path):
    with pytest.raises(hub.HubFileNotFoundError, match="neither an existing folder nor a Hub repo"):
        hub.resolve_file(str(tmp_path / "nope" / "deeper"), "config.json")


def test_offline_cache_miss_says_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(hub.HubFileNotFoundError, match=r"not in the cache.*HF_HUB_OFFLINE"):
        hub.resolve_file(
            "google/ddpm-cat-256", "config.json", "unet", cache_dir=tmp_path, local_files_only=True
        )


def test_repo_id_served_from_the_huggingface_cache(tmp_path):
    """A repo present in the huggingface_hub cache layout resolves offline, by revision."""
    repo = tmp_path / "models--owner--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit / "scheduler"
    snap.mkdir(parents=True)
    (snap / "scheduler_config.json").write_text('{"num_train_timesteps": 12}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = hub.resolve_file(
        "owner/tiny",
        "scheduler_config.json",
        "scheduler",
        cache_dir=tmp_path,
        local_files_only=True,
    )
    assert path.endswith("scheduler/scheduler_config.json")
    from jaxdiff.schedulers.common import SchedulerMixin  # noqa: F401 - package import check

    assert hub.list_files("owner/tiny", "scheduler", cache_dir=tmp_path, local_files_only=True) == [
        "scheduler_config.json"
    ]


def test_hf_hub_offline_env_is_honoured(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubFileNotFoundError, match="HF_HUB_OFFLINE"):
        hub.resolve_file("owner/absent", "config.json", cache_dir=tmp_path)


def test_pop_hub_kwargs():
    kwargs = {"revision": "v1", "dtype": 1, "cache_dir": "/x"}
    assert hub.pop_hub_kwargs(kwargs) == {"revision": "v1", "cache_dir": "/x"}
    assert kwargs == {"dtype": 1}
