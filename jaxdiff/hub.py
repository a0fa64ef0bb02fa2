"""A Hub repo id or a local folder -> local files.

Local folders are used as they are. Anything else is a Hub repo id, fetched through
huggingface_hub, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``revision`` and
``HF_HUB_OFFLINE=1`` behave as in diffusers. Every failure is one :class:`HubFileNotFoundError`
that names what was looked for, where, and how to get it.
"""

from __future__ import annotations

import os
import re
from typing import Any

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


class HubFileNotFoundError(FileNotFoundError):
    """A repo, folder or file that a loader needs could not be found (locally or on the Hub)."""


def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Removes the Hub download options from ``kwargs`` and returns them."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def _join(subfolder: str | None, filename: str) -> str:
    return f"{subfolder.strip('/')}/{filename}" if subfolder else filename


def is_local(path_or_repo: str | os.PathLike) -> bool:
    return os.path.isdir(os.fspath(path_or_repo))


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _is_repo_id(name: str) -> bool:
    """'owner/name' or 'name', as the Hub spells repo ids (not a path)."""
    return _REPO_ID.fullmatch(name) is not None and ".." not in name


def resolve_file(
    path_or_repo: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    required: bool = True,
) -> str | None:
    """Returns the local path of ``<path_or_repo>/<subfolder>/<filename>``.

    Args:
        path_or_repo: a local folder in Hub layout, or a Hub repo id such as
            ``"google/ddpm-cat-256"``.
        filename: the file inside the (sub)folder, e.g. ``"config.json"``.
        subfolder: e.g. ``"unet"`` for a pipeline repo.
        revision, cache_dir, token, force_download: passed to ``huggingface_hub``.
        local_files_only: use only the cache; defaults to ``HF_HUB_OFFLINE``.
        required: when False, a missing file returns None instead of raising.

    Raises:
        HubFileNotFoundError: naming the repo/folder, the file and how to get it.
    """
    name = os.fspath(path_or_repo)
    rel = _join(subfolder, filename)
    if os.path.isdir(name):
        path = os.path.join(name, rel)
        if os.path.isfile(path):
            return path
        if not required:
            return None
        where = os.path.join(name, subfolder) if subfolder else name
        present = sorted(os.listdir(where)) if os.path.isdir(where) else None
        detail = (
            f"that folder holds {present}"
            if present is not None
            else f"the folder {where!r} does not exist"
        )
        raise HubFileNotFoundError(
            f"{filename!r} not found in the local folder {where!r} ({detail}). "
            "Expected the diffusers Hub layout, e.g. model_index.json, unet/config.json, "
            "unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json."
        )
    if not _is_repo_id(name) or os.path.exists(name):
        raise HubFileNotFoundError(
            f"{name!r} is neither an existing folder nor a Hub repo id (expected 'owner/name')."
        )
    return _download(
        name, rel, revision, cache_dir, token, local_files_only, force_download, required
    )


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo, rel, revision, cache_dir, token, local_files_only, force_download, required):
    import huggingface_hub
    from huggingface_hub import errors

    offline = _offline() if local_files_only is None else local_files_only
    try:
        return huggingface_hub.hf_hub_download(
            repo_id=repo,
            filename=rel,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=offline,
            force_download=force_download,
        )
    except errors.LocalEntryNotFoundError as err:
        if not required and offline:
            return None
        how = (
            "HF_HUB_OFFLINE is set (or local_files_only=True), so only the cache was searched: "
            "unset it while online to download, or pass a local folder"
            if offline
            else "the Hub could not be reached and the cache has no copy: check the network, or "
            "pass a local folder in Hub layout"
        )
        raise HubFileNotFoundError(
            f"{rel!r} of Hub repo {repo!r} (revision {revision or 'main'}) is not in the cache "
            f"({cache_dir or 'the default huggingface_hub cache'}); {how}."
        ) from err
    except errors.EntryNotFoundError as err:
        if not required:
            return None
        raise HubFileNotFoundError(
            f"The Hub repo {repo!r} (revision {revision or 'main'}) has no file {rel!r}."
        ) from err
    except errors.RepositoryNotFoundError as err:
        raise HubFileNotFoundError(
            f"Hub repo {repo!r} was not found (or it is private/gated: log in with "
            "`hf auth login` or pass token=...). A local folder path must exist."
        ) from err
    except errors.RevisionNotFoundError as err:
        raise HubFileNotFoundError(f"Hub repo {repo!r} has no revision {revision!r}.") from err
    except (OSError, ValueError) as err:
        raise HubFileNotFoundError(f"Could not get {rel!r} from Hub repo {repo!r}: {err}") from err


def list_files(
    path_or_repo: str | os.PathLike, subfolder: str | None = None, **hub_kwargs
) -> list[str]:
    """File names directly inside ``<path_or_repo>/<subfolder>`` (local folder or Hub repo).

    For a Hub repo offline, this lists what the cache holds for that revision.
    """
    name = os.fspath(path_or_repo)
    if os.path.isdir(name):
        where = os.path.join(name, subfolder) if subfolder else name
        return sorted(os.listdir(where)) if os.path.isdir(where) else []
    import huggingface_hub

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    revision = hub_kwargs.get("revision")
    offline = hub_kwargs.get("local_files_only")
    offline = _offline() if offline is None else offline
    if offline:
        try:
            snapshot = huggingface_hub.snapshot_download(
                name,
                revision=revision,
                cache_dir=hub_kwargs.get("cache_dir"),
                local_files_only=True,
            )
        except Exception as err:  # noqa: BLE001 - reported as one clear error
            raise HubFileNotFoundError(
                f"Hub repo {name!r} is not in the cache and HF_HUB_OFFLINE is set: {err}"
            ) from err
        return list_files(snapshot, subfolder)
    try:
        files = huggingface_hub.list_repo_files(
            name, revision=revision, token=hub_kwargs.get("token")
        )
    except Exception as err:  # noqa: BLE001 - reported as one clear error
        raise HubFileNotFoundError(f"Could not list the files of Hub repo {name!r}: {err}") from err
    return sorted(
        f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]
    )
