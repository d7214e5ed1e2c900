"""A stand-in for the Hugging Face Hub, so that the real huggingface_hub download code runs with no network.

`FakeHub` has two halves:
- a stand-in `HfApi` (`create_repo`, `create_commit`, what `push_to_hub` uses) that keeps every commit as a full tree
  of files: a new commit copies its parent's tree and adds the files of its operations;
- a transport: `huggingface_hub.hf_hub_download` / `snapshot_download` are wrapped so that, before the REAL function
  runs, the files the call asks for (its `filename`, or the repo files its `allow_patterns` select, filtered with
  huggingface_hub's own `filter_repo_objects`, as the online code path does) are written into a temporary cache in
  huggingface_hub's layout (`models--org--name/refs/<branch>` holding the 40-hex commit id,
  `snapshots/<commit>/<files>`). With `HF_HUB_OFFLINE=1` (conftest) the real functions then resolve from that cache.

So "task_1 was not fetched" is checked two ways: the transport's log of requested files has no `task_1/` path, and the
snapshot folder the loader read from holds no `task_1/` (only requested files are ever materialised, so a code path
that needed them would fail to load).
"""

import hashlib
from pathlib import Path

import huggingface_hub
from huggingface_hub import CommitInfo, CommitOperationAdd
from huggingface_hub.utils import filter_repo_objects

REAL_HF_HUB_DOWNLOAD = huggingface_hub.hf_hub_download


REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


class FakeHub:
    """A stand-in `HfApi` plus the transport that materialises requested files into a huggingface_hub cache."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.repos: dict[str, dict] = {}
        self.commits: list[CommitInfo] = []
        self.operations: list[list[str]] = []  # paths added by each commit
        self.requested: list[dict] = []  # one entry per download call: repo, revision, files

    # -- HfApi ---------------------------------------------------------------------------------------------------

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, token=None, **kwargs):
        assert repo_type in (None, "model")
        if repo_id in self.repos and not exist_ok:
            raise ValueError(f"{repo_id} exists")
        self.repos.setdefault(repo_id, {"refs": {}, "trees": {}, "private": private})
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, repo_type=None, token=None, **kw):
        repo = self.repos[repo_id]  # KeyError if create_repo was not called first
        branch = revision or "main"
        parent = repo["refs"].get(branch)
        tree = dict(repo["trees"][parent]) if parent else {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            source = op.path_or_fileobj
            tree[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        digest = hashlib.sha1(f"{parent}\n{commit_message}".encode())
        for path in sorted(tree):
            digest.update(path.encode() + hashlib.sha256(tree[path]).digest())
        oid = digest.hexdigest()
        repo["trees"][oid] = tree
        repo["refs"][branch] = oid
        info = CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=commit_message,
            commit_description="",
            oid=oid,
        )
        self.commits.append(info)
        self.operations.append(sorted(op.path_in_repo for op in operations))
        return info

    def create_branch(self, repo_id, *, branch, exist_ok=False, repo_type=None, token=None, **kwargs):
        refs = self.repos[repo_id]["refs"]
        if branch in refs and not exist_ok:
            raise ValueError(f"branch {branch} exists")
        if branch not in refs and "main" in refs:
            refs[branch] = refs["main"]

    def upload_folder(self, *args, **kwargs):
        raise AssertionError("push_to_hub commits with create_commit (one commit per task)")

    # -- transport -----------------------------------------------------------------------------------------------

    def tree(self, repo_id, revision=None) -> dict[str, bytes]:
        refs = self.repos[repo_id]["refs"]
        return self.repos[repo_id]["trees"][refs.get(revision or "main", revision)]

    def materialise(self, repo_id, revision, patterns, cache_dir=None, local_dir=None) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return  # the real function then finds nothing in the cache and raises
        oid = repo["refs"].get(revision or "main", revision)
        if oid not in repo["trees"]:
            return
        tree = repo["trees"][oid]
        files = list(filter_repo_objects(tree.keys(), allow_patterns=patterns))
        self.requested.append(dict(repo=repo_id, revision=revision, patterns=patterns, files=files))
        if local_dir is not None:
            base = Path(local_dir)
        else:
            storage = Path(cache_dir or self.cache_dir) / ("models--" + repo_id.replace("/", "--"))
            if revision is None or oid != revision:
                (storage / "refs").mkdir(parents=True, exist_ok=True)
                (storage / "refs" / (revision or "main")).write_text(oid)
            base = storage / "snapshots" / oid
        for path in files:
            (base / path).parent.mkdir(parents=True, exist_ok=True)
            (base / path).write_bytes(tree[path])

    def install(self, monkeypatch) -> None:
        def hf_hub_download(repo_id, filename, **kwargs):
            self.materialise(
                repo_id, kwargs.get("revision"), [filename], kwargs.get("cache_dir"), kwargs.get("local_dir")
            )
            return REAL_HF_HUB_DOWNLOAD(repo_id, filename, **kwargs)

        def snapshot_download(repo_id, **kwargs):
            patterns = kwargs.get("allow_patterns")
            self.materialise(
                repo_id, kwargs.get("revision"), patterns, kwargs.get("cache_dir"), kwargs.get("local_dir")
            )
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, **kwargs)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    def requested_files(self) -> set[str]:
        return {path for call in self.requested for path in call["files"]}
