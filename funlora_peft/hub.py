"""Hugging Face Hub access for FunLoRA runs: push a run one commit per task, download only the tasks you need.

A Hub model repo holds the run folder layout of `funlora_peft.run_folder` as is (plus the card, `README.md`, and the
sample grids), so `FunLoRAPipeline.from_pretrained` takes a folder or a repo id alike.

Example:

    ```py
    >>> from funlora_peft.hub import download_run, push_to_hub
    >>> push_to_hub("runs/digits", "me/funlora-digits", license="apache-2.0")    # one commit per task
    >>> download_run("me/funlora-digits", tasks=["task_0", "task_2"])            # backbone, index, 2 tasks only
    PosixPath('.../snapshots/<commit>')
    ```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .model_card import build_model_card, metrics_for_card
from .run_folder import (
    BACKBONE_SUBFOLDER,
    IMPORTANCE_FILE,
    IMPORTANCE_PLOT,
    INDEX_FILE,
    MODEL_CARD_FILE,
    SCHEDULER_SUBFOLDER,
    RunIndex,
    read_importance,
    read_index,
    sample_grid_path,
    select_tasks,
    verify_file,
)


def _hub_error(what: str, repo_id: str, revision: str | None, err: Exception) -> ValueError:
    return ValueError(
        f"Could not get {what} of {repo_id!r} (revision {revision!r}): {type(err).__name__}: {err}. Check the repo "
        "id or local path, the revision, your token, and the network (or the cache when offline)."
    )


def download_index(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[Path, RunIndex]:
    """Download `funlora.json` only and read it: the local folder it lies in and the checked index.

    Use it to learn which tasks a repo has (and which task owns a class) before downloading any weights.

    Example:

        ```py
        >>> folder, index = download_index("me/funlora-digits")
        >>> index.owner_of(7)
        'task_3'
        ```
    """
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(
            repo_id,
            INDEX_FILE,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
    except Exception as err:  # noqa: BLE001 - the Hub raises many types; the message says what to check
        raise _hub_error(INDEX_FILE, repo_id, revision, err) from err
    folder = Path(index_path).parent
    return folder, read_index(folder)


def download_run(
    repo_id: str,
    tasks: list[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    local_dir: str | os.PathLike | None = None,
) -> Path:
    """Download the index, the backbone and the adapters of `tasks` (all when None) of a run on the Hub.

    Returns the local snapshot folder (or `local_dir` when given), which has the run folder layout
    (`funlora_peft.run_folder`). Only files under `backbone/`, `funlora.json` and the named task folders are requested
    (`snapshot_download(allow_patterns=...)`); files of other tasks are not fetched. With `HF_HUB_OFFLINE=1` the files
    are resolved from the local cache. `revision` (branch, tag or commit id) applies to every file. The snapshot folder
    may also hold files that earlier calls fetched; the loaders read only the tasks they are asked for.

    Example:

        ```py
        >>> folder = download_run("me/funlora-digits", tasks=["task_0", "task_2"], revision="main")
        >>> sorted(p.name for p in folder.iterdir())  # with a fresh cache
        ['backbone', 'funlora.json', 'task_0', 'task_2']
        ```
    """
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    _, index = download_index(repo_id, **kwargs)
    backbone = index.backbone or BACKBONE_SUBFOLDER
    patterns = [INDEX_FILE, f"{backbone}/*", f"{SCHEDULER_SUBFOLDER}/*"]
    patterns += [f"{task.name}/*" for task in select_tasks(index, tasks)]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_dir=local_dir, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise _hub_error(f"the files {patterns}", repo_id, revision, err) from err
    return Path(folder)


def _files_under(folder: Path, sub: str) -> list[str]:
    """Relative posix paths of the regular, non-hidden files under `folder/sub`."""
    root = folder / sub
    if not root.is_dir():
        raise ValueError(f"{root} is missing: the run folder {folder} lists {sub!r} in {INDEX_FILE}.")
    return sorted(
        path.relative_to(folder).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _partial_index(index: RunIndex, upto: int) -> RunIndex:
    """The index of the run as it stood after task `upto`: tasks 0..upto and the sha256 of their files only."""
    tasks = index.tasks[: upto + 1]
    prefixes = tuple(f"{sub}/" for sub in [index.backbone, SCHEDULER_SUBFOLDER] + [task.name for task in tasks])
    return RunIndex(
        format_version=index.format_version,
        backbone=index.backbone,
        tasks=list(tasks),
        class_names=dict(index.class_names),
        sha256={k: v for k, v in index.sha256.items() if k.startswith(prefixes)},
    )


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    tasks: list[str] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
    license: str | None = None,
    base_model: str | None = None,
    include_backbone: bool | None = None,
) -> list:
    """Upload the run folder `output_dir` to the Hub model repo `repo_id`, one commit per task, in run order.

    The repo is created if needed (`create_repo(exist_ok=True)`). The commit of task k adds `task_k/`, the index
    `funlora.json` as it stood after task k (tasks 0..k), the model card `README.md` describing tasks 0..k, and
    `samples/after_task_k.png` when the folder has it; the first commit of the push also adds `backbone/`. Every
    revision of the repo is thus a complete run: checking out the commit of task k gives the run after task k. Each
    safetensors file is checked against the local index before anything is uploaded.

    Args:
        output_dir: a run folder (`funlora.json`, `backbone/`, `task_k/`, optional `metrics.json` and `samples/`).
        repo_id: `"user/name"` of the model repo.
        tasks: the task folders to upload (all when None), e.g. `["task_3"]` to add a new task to a repo holding
            tasks 0..2. The index pushed with task k always lists tasks 0..k of the run.
        private, token: passed to `create_repo` / `create_commit`.
        revision: the branch to commit to (created from main if missing); default main.
        commit_message: prefix of every commit message; each message then names its task.
        api: an `HfApi`-like object with `create_repo`, `create_branch` (used when `revision` is given) and
            `create_commit` (default `HfApi(token=token)`).
        license, base_model: model card metadata.
        include_backbone: upload `backbone/` with the push's first commit. Default (None): when the push includes
            the run's first task, so pushing `tasks=["task_3"]` to a repo that holds tasks 0..2 adds the task only.

    Returns:
        The `CommitInfo` of each commit, in order.

    Example:

        ```py
        >>> from funlora_peft.hub import push_to_hub
        >>> commits = push_to_hub("runs/digits", "me/funlora-digits", private=True, license="apache-2.0")
        >>> [c.commit_message for c in commits][:2]
        ['Upload task_0 (classes [0, 1]) and backbone', 'Upload task_1 (classes [2, 3])']
        ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(output_dir)
    if not folder.is_dir():
        raise ValueError(f"`output_dir` {str(folder)!r} is not a folder: pass the run folder written by training.")
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"`repo_id` must be 'user/name' (or 'name'), got {repo_id!r}.")
    index = read_index(folder)
    entries = select_tasks(index, tasks)
    if not entries:
        raise ValueError("`tasks` is empty: name at least one task to push, or pass None to push them all.")
    # Refuse a corrupted or unlisted weight file before the first byte leaves the machine.
    pushed = [index.backbone] + [task.name for task in entries]
    for sub in pushed:
        for relpath in _files_under(folder, sub):
            if relpath.endswith(".safetensors") or relpath in index.sha256:
                verify_file(folder, relpath, index)

    api = api if api is not None else HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision is not None:
        # create_commit only commits to an existing branch; a new one starts from the repo's main branch.
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    metrics = metrics_for_card(folder)
    importance = read_importance(folder)
    commits = []
    if include_backbone is None:
        include_backbone = entries[0].name == index.task_names[0]
    for number, task in enumerate(entries):
        with_backbone = include_backbone and number == 0
        position = index.task_names.index(task.name)
        partial = _partial_index(index, position)
        subfolders = ([index.backbone] if with_backbone else []) + [task.name]
        if with_backbone and (folder / SCHEDULER_SUBFOLDER).is_dir():
            subfolders.append(SCHEDULER_SUBFOLDER)
        operations = [
            CommitOperationAdd(path_in_repo=relpath, path_or_fileobj=str(folder / relpath))
            for sub in subfolders
            for relpath in _files_under(folder, sub)
        ]
        grid = sample_grid_path(task) if (folder / sample_grid_path(task)).is_file() else None
        if grid is not None:
            operations.append(CommitOperationAdd(path_in_repo=grid, path_or_fileobj=str(folder / grid)))
        # The layer selection concerns the tasks after task 0: it travels from their commits on.
        extras = [name for name in (IMPORTANCE_FILE, IMPORTANCE_PLOT) if position > 0 and (folder / name).is_file()]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in extras]
        card = build_model_card(
            partial,
            repo_id=repo_id,
            metrics=metrics,
            sample_grid=grid,
            license=license,
            base_model=base_model,
            importance=importance if IMPORTANCE_FILE in extras else None,
            importance_plot=IMPORTANCE_PLOT if IMPORTANCE_PLOT in extras else None,
        )
        operations += [
            CommitOperationAdd(path_in_repo=INDEX_FILE, path_or_fileobj=partial.to_json().encode()),
            CommitOperationAdd(path_in_repo=MODEL_CARD_FILE, path_or_fileobj=str(card).encode()),
        ]
        message = f"Upload {task.name} (classes {task.class_ids})" + (" and backbone" if with_backbone else "")
        if commit_message:
            message = f"{commit_message}: {message}"
        commits.append(
            api.create_commit(
                repo_id, operations, commit_message=message, revision=revision, repo_type="model", token=token
            )
        )
    return commits


__all__ = ["download_index", "download_run", "push_to_hub"]
