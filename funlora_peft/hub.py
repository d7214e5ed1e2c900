"""Hugging Face Hub access for FunLoRA runs: download only the tasks you need."""

from __future__ import annotations

from pathlib import Path

from .repository import BACKBONE_SUBFOLDER, INDEX_FILE, read_index, select_tasks


def download_run(
    repo_id: str,
    tasks: list[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download the index, the backbone and the adapters of `tasks` (all when None) of a run on the Hub.

    Returns the local snapshot folder, which has the run folder layout (`funlora_peft.repository`). Files of other
    tasks are not fetched. With `HF_HUB_OFFLINE=1` the files are resolved from the local cache.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        index_path = hf_hub_download(repo_id, INDEX_FILE, **kwargs)
    except Exception as err:  # noqa: BLE001 - the Hub raises many types; the message says what to check
        raise ValueError(
            f"Could not get {INDEX_FILE} of {repo_id!r} (revision {revision!r}): {type(err).__name__}: {err}. Check "
            "the repo id or local path, the revision, your token, and the network (or the cache when offline)."
        ) from err
    folder = Path(index_path).parent
    index = read_index(folder)
    backbone = index.backbone or BACKBONE_SUBFOLDER
    patterns = [INDEX_FILE, f"{backbone}/*"] + [f"{task.name}/*" for task in select_tasks(index, tasks)]
    return Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
