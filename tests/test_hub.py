"""Hub round trip with no network: push a run to a fake Hub, load some of its tasks back through huggingface_hub.

The fake Hub (`FakeHub`) has two halves:
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
import json
import re
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from test_pipeline import TASKS, make_run

from funlora_peft.cli import main
from funlora_peft.continual.evaluation import class_seed
from funlora_peft.hub import download_run, push_to_hub
from funlora_peft.model_card import write_model_card
from funlora_peft.pipeline import FunLoRAPipeline

REPO = "someone/funlora-tiny"
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


METRICS = {
    "real_data_accuracy": 0.97,
    "tasks": [
        {
            "task": k,
            "class_ids": ids,
            "seen_class_ids": [c for done in list(TASKS.values())[: k + 1] for c in done],
            "cas": 0.9 - 0.1 * k,
            "cas_per_task": [0.9] * (k + 1),
            "recognition": 0.95,
            "accuracy_per_task": [0.95] * (k + 1),
            "fd": 1.5 + k,
            "train_seconds": 12.0,
            "extra_parameters_per_class": 1234,
        }
        for k, ids in enumerate(TASKS.values())
    ],
}


@pytest.fixture(scope="module")
def run_source(tmp_path_factory):
    """A 3-task run folder with metrics.json and a sample grid after every task (built once, never modified)."""
    folder = tmp_path_factory.mktemp("run")
    make_run(folder)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "samples").mkdir()
    for k in range(3):
        Image.new("L", (8 * 4, 8 * (2 * k + 2)), color=40 * k).save(folder / "samples" / f"after_task_{k}.png")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, run_source):
    """A fake Hub holding the run pushed to REPO; downloads land in `hub.cache_dir`, nothing in the default cache."""
    fake = FakeHub(tmp_path / "cache")
    fake.install(monkeypatch)
    # cache_dir must be passed through: the default cache is empty and unrelated.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    fake.pushed = push_to_hub(run_source, REPO, api=fake, license="apache-2.0", commit_message="FunLoRA")
    return fake


def load(source, **kwargs):
    pipe = FunLoRAPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels, seed=0):
    return pipe(class_labels=labels, num_inference_steps=3, generator=torch.manual_seed(seed), output_type="pt").images


def test_push_makes_one_commit_per_task_each_a_complete_run(hub, run_source):
    messages = [c.commit_message for c in hub.pushed]
    assert messages == [
        "FunLoRA: Upload task_0 (classes [0, 1]) and backbone",
        "FunLoRA: Upload task_1 (classes [2, 3])",
        "FunLoRA: Upload task_2 (classes [4])",
    ]
    # the backbone goes once, with the first task; each commit adds its task, index, card and grid
    assert [any(p.startswith("backbone/") for p in ops) for ops in hub.operations] == [True, False, False]
    for k, ops in enumerate(hub.operations):
        task_files = [p for p in ops if re.match(r"task_\d/", p)]
        assert {p.split("/")[0] for p in task_files} == {f"task_{k}"}
        assert {"funlora.json", "README.md", f"samples/after_task_{k}.png"} <= set(ops)
    # every commit's index lists the tasks pushed so far, so any revision is a loadable run
    for k, commit in enumerate(hub.pushed):
        index = json.loads(hub.tree(REPO, commit.oid)["funlora.json"])
        assert [t["name"] for t in index["tasks"]] == list(TASKS)[: k + 1]
        assert all(not key.startswith(f"task_{k + 1}/") for key in index["sha256"])
    final = hub.tree(REPO)
    for path in ["backbone/diffusion_pytorch_model.safetensors", "task_2/adapter_model.safetensors"]:
        assert final[path] == (run_source / path).read_bytes()
    assert json.loads(final["funlora.json"]) == json.loads((run_source / "funlora.json").read_text())


def test_load_two_tasks_through_the_hub_fetches_only_them_and_samples_identically(hub, run_source):
    pipe = load(REPO, tasks=["task_0", "task_2"], cache_dir=hub.cache_dir)
    assert pipe.class_ids == [0, 1, 4]
    # not fetched: never requested, and absent from the snapshot the pipeline was loaded from
    requested = hub.requested_files()
    assert "task_0/adapter_model.safetensors" in requested and "backbone/config.json" in requested
    assert not any(path.startswith("task_1/") for path in requested)
    (snapshot,) = (hub.cache_dir / "models--someone--funlora-tiny" / "snapshots").iterdir()
    assert snapshot.name == hub.pushed[-1].oid
    assert sorted(p.name for p in snapshot.iterdir()) == ["backbone", "funlora.json", "task_0", "task_2"]
    # bit-identical samples to the run folder loaded locally, for mixed and single-class batches
    local = load(run_source, tasks=["task_0", "task_2"])
    full = load(run_source)
    for labels in ([4, 0, 1, 4], [1, 1]):
        got = sample(pipe, labels)
        assert torch.equal(got, sample(local, labels))
        assert torch.equal(got, sample(full, labels))


def test_revision_is_passed_through_everywhere(hub):
    after_task_1 = hub.pushed[1].oid
    pipe = load(REPO, tasks=["task_1"], revision=after_task_1, cache_dir=hub.cache_dir)
    assert pipe.class_ids == [2, 3] and pipe.index.task_names == ["task_0", "task_1"]
    assert [call["revision"] for call in hub.requested] == [after_task_1, after_task_1]
    with pytest.raises(ValueError, match=r"`tasks` names \['task_2'\].*\['task_0', 'task_1'\]"):
        load(REPO, tasks=["task_2"], revision=after_task_1, cache_dir=hub.cache_dir)
    with pytest.raises(ValueError, match="Could not get funlora.json of 'someone/funlora-tiny' \\(revision 'nope'\\)"):
        load(REPO, revision="nope", cache_dir=hub.cache_dir)


def test_model_card_metadata_and_body(hub, run_source):
    folder = download_run(REPO, tasks=["task_0"], cache_dir=hub.cache_dir)
    assert (folder / "README.md").is_file() is False  # not requested
    readme = huggingface_hub.hf_hub_download(REPO, "README.md", cache_dir=hub.cache_dir)
    card = ModelCard.load(readme)
    assert card.data.library_name == "funlora-peft"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "apache-2.0"
    assert set(card.data.tags) == {"funlora", "peft", "diffusers", "continual-learning", "flow-matching"}
    assert "| `task_1` | 2, 3 | two, three | cos (p=10) |" in card.text
    assert "| `task_2` | 0.7000 | [0.950, 0.950, 0.950] | 3.500 | 12.0 | 1234 |" in card.text
    assert "![samples](samples/after_task_2.png)" in card.text
    assert f'FunLoRAPipeline.from_pretrained("{REPO}", tasks=["task_0", "task_1"])' in card.text
    assert hub.tree(REPO)["samples/after_task_2.png"] == (run_source / "samples/after_task_2.png").read_bytes()
    # the card of the first commit describes task 0 only
    first = ModelCard(hub.tree(REPO, hub.pushed[0].oid)["README.md"].decode())
    assert "`task_0`" in first.text and "`task_1`" not in first.text and "after_task_0.png" in first.text


def test_write_model_card_in_a_run_folder(tmp_path, run_source):
    make_run(tmp_path)  # no metrics.json, no samples
    card = ModelCard.load(write_model_card(tmp_path, license="mit"))
    assert card.data.library_name == "funlora-peft" and card.data.license == "mit"
    assert "## Tasks" in card.text and "## Metrics" not in card.text and "## Samples" not in card.text
    (tmp_path / "metrics.json").write_text("{not json")  # unreadable metrics are left out, not fatal
    assert "## Metrics" not in ModelCard.load(write_model_card(tmp_path)).text


def _commit(hub, path, data):
    hub.create_commit(REPO, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)], commit_message="edit")


def test_tampered_adapter_on_the_hub_is_refused(hub):
    path = "task_1/adapter_model.safetensors"
    data = bytearray(hub.tree(REPO)[path])
    data[-1] ^= 0x01
    _commit(hub, path, bytes(data))  # a commit that changes the weights but not the index
    with pytest.raises(ValueError, match=r"task_1/adapter_model.safetensors: sha256 .* does not match"):
        load(REPO, tasks=["task_0", "task_1"], cache_dir=hub.cache_dir)
    # the untouched tasks still load
    assert load(REPO, tasks=["task_0", "task_2"], cache_dir=hub.cache_dir).class_ids == [0, 1, 4]


def test_unknown_format_version_on_the_hub_is_refused(hub):
    index = json.loads(hub.tree(REPO)["funlora.json"])
    _commit(hub, "funlora.json", json.dumps({**index, "format_version": 99}).encode())
    with pytest.raises(ValueError, match="unknown format_version 99"):
        load(REPO, cache_dir=hub.cache_dir)
    assert not any(path.endswith(".safetensors") for path in hub.requested_files())


def test_push_refuses_a_corrupted_run_before_uploading(tmp_path):
    make_run(tmp_path)
    path = tmp_path / "task_2" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    fake = FakeHub(tmp_path / "cache")
    with pytest.raises(ValueError, match="task_2/adapter_model.safetensors: sha256"):
        push_to_hub(tmp_path, REPO, api=fake)
    assert fake.commits == [] and fake.repos == {}
    with pytest.raises(ValueError, match="`repo_id` must be 'user/name'"):
        push_to_hub(tmp_path, "a/b/c", api=fake)
    with pytest.raises(ValueError, match=r"`tasks` names \['task_7'\]"):
        push_to_hub(tmp_path, REPO, tasks=["task_7"], api=fake)


def test_push_some_tasks_adds_them_to_the_repo(tmp_path, run_source):
    fake = FakeHub(tmp_path / "cache")
    push_to_hub(run_source, REPO, tasks=["task_0", "task_1"], api=fake)
    push_to_hub(run_source, REPO, tasks=["task_2"], api=fake)
    assert len(fake.commits) == 3
    # the backbone went with task_0: a later push adds its task only
    assert {p.split("/")[0] for p in fake.operations[2]} == {"task_2", "funlora.json", "README.md", "samples"}
    assert fake.commits[2].commit_message == "Upload task_2 (classes [4])"
    tree = fake.tree(REPO)
    assert (
        tree["backbone/diffusion_pytorch_model.safetensors"]
        == (run_source / "backbone" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert json.loads(tree["funlora.json"]) == json.loads((run_source / "funlora.json").read_text())
    # a repo started from a later task needs the backbone: include_backbone=True sends it
    other = FakeHub(tmp_path / "cache2")
    push_to_hub(run_source, REPO, tasks=["task_2"], api=other, include_backbone=True)
    assert other.commits[0].commit_message == "Upload task_2 (classes [4]) and backbone"
    assert any(p.startswith("backbone/") for p in other.operations[0])


# -- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_sample_from_the_hub_loads_only_the_owning_tasks(hub, run_source, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", REPO, "--classes", "4,0", "--num_samples", "3", "--num_inference_steps", "2", "--seed", "5"]
    assert main(argv + ["--scale", "1", "--output", str(out), "--cache_dir", str(hub.cache_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: classes [4, 0], 3 samples each")
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)  # one row per class, 3 columns, 1-pixel white padding
    requested = hub.requested_files()
    assert not any(path.startswith("task_1/") for path in requested)
    assert {p.split("/")[0] for p in requested if p.startswith("task_")} == {"task_0", "task_2"}
    # each row holds the pipeline's samples of that class, drawn with the class's own generator
    local = load(run_source)
    for row, class_id in enumerate([4, 0]):
        generator = torch.Generator().manual_seed(class_seed(5, class_id))
        images = local(class_labels=[class_id] * 3, num_inference_steps=2, generator=generator).images
        for column, image in enumerate(images):
            top, left = 1 + 9 * row, 1 + 9 * column
            np.testing.assert_array_equal(grid[top : top + 8, left : left + 8], np.asarray(image))
    # a run folder works the same way
    local_out = tmp_path / "local.png"
    argv[1] = str(run_source)
    assert main(argv + ["--scale", "1", "--output", str(local_out)]) == 0
    assert np.array_equal(np.asarray(Image.open(local_out)), grid)


def test_cli_download_fetches_only_the_named_tasks(hub, tmp_path, capsys):
    argv = ["download", REPO, "--tasks", "task_0,task_2", "--cache_dir", str(hub.cache_dir)]
    assert main(argv + ["--revision", hub.pushed[-1].oid]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert sorted(p.name for p in folder.iterdir()) == ["backbone", "funlora.json", "task_0", "task_2"]
    assert not any(path.startswith("task_1/") for path in hub.requested_files())
    local_dir = tmp_path / "here"
    assert main(argv + ["--local_dir", str(local_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()) == local_dir.resolve()
    assert (local_dir / "task_2" / "adapter_model.safetensors").is_file() and not (local_dir / "task_1").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sample", "RUN", "--classes", "3,x", "--out", "g.png"], "argument --classes: expected comma-separated"),
        (
            ["sample", "RUN", "--classes", "9", "--out", "g.png"],
            r"--classes \[9\] belong to no task.*\[0, 1, 2, 3, 4\]",
        ),
        (["sample", "RUN", "--classes", "3", "--out", "g.jpg"], "--output must name a .png file"),
        (["sample", "RUN", "--classes", "3", "-n", "0", "--out", "g.png"], "argument -n: expected a positive integer"),
        (["sample", "RUN", "--classes", "3", "--tasks", "task_9", "--out", "g.png"], r"`tasks` names \['task_9'\]"),
        (["sample", "RUN", "--classes", "3"], "--output is required"),
        (["download", "someone/missing", "--tasks", "task_0"], "Could not get funlora.json of 'someone/missing'"),
        (["download", REPO, "--tasks", ","], "argument --tasks: expected comma-separated task names"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_with_a_clear_message(hub, run_source, tmp_path, capsys, argv, match):
    argv = [str(run_source) if a == "RUN" else str(tmp_path / a) if a.startswith("g.") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--cache_dir", str(hub.cache_dir)] if argv[0] != "frobnicate" else argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "g.png").exists()


def test_push_to_a_branch_and_load_from_it(tmp_path, monkeypatch, run_source):
    fake = FakeHub(tmp_path / "cache")
    fake.install(monkeypatch)
    push_to_hub(run_source, REPO, tasks=["task_0"], api=fake, private=True)
    push_to_hub(run_source, REPO, tasks=["task_1"], api=fake, revision="more")
    assert fake.repos[REPO]["private"] is True
    assert len(fake.tree(REPO, "main")) < len(fake.tree(REPO, "more"))
    pipe = load(REPO, revision="more", cache_dir=fake.cache_dir)
    assert pipe.index.task_names == ["task_0", "task_1"] and pipe.class_ids == [0, 1, 2, 3]
    assert load(REPO, cache_dir=fake.cache_dir).class_ids == [0, 1]


# ---------------------------------------------------------------------------------------------------------------------
# The training script's --push_to_hub, through the same fake Hub


@pytest.fixture(scope="module")
def pushed_training_run(tmp_path_factory):
    """`examples/train.py --push_to_hub` (tiny, 2 tasks, --select_layers top_k=3), run in this process with the fake
    Hub standing in for `huggingface_hub.HfApi`; built once for the tests below."""
    from test_train import TINY, load_train_module

    train = load_train_module()
    root = tmp_path_factory.mktemp("train-push")
    fake = FakeHub(root / "cache")
    tokens = []

    def hf_api(token=None, **kwargs):
        tokens.append(token)
        return fake

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "HfApi", hf_api)
        argv = [*TINY, "--report_to", "none", "--output_dir", str(root / "run"), "--select_layers", "top_k=3"]
        argv += ["--push_to_hub", "--hub_model_id", "someone/trained", "--hub_token", "hf_fake", "--hub_private_repo"]
        train.main(train.parse_args(argv))
    return SimpleNamespace(hub=fake, folder=root / "run", tokens=tokens)


def test_train_script_pushes_one_commit_per_task_from_the_run_folder(pushed_training_run):
    hub, folder = pushed_training_run.hub, pushed_training_run.folder
    assert pushed_training_run.tokens == ["hf_fake", "hf_fake"] and hub.repos["someone/trained"]["private"] is True
    assert [c.commit_message for c in hub.commits] == [
        "Upload task_0 (classes [0, 1]) and backbone",
        "Upload task_1 (classes [2, 3])",
    ]
    assert [any(p.startswith("backbone/") for p in ops) for ops in hub.operations] == [True, False]
    # the layer selection travels with the tasks it concerns
    assert "importance.json" not in hub.operations[0] and {"importance.json", "importance.png"} <= set(
        hub.operations[1]
    )
    final = hub.tree("someone/trained")
    for path, data in final.items():
        if path not in ("README.md", "funlora.json"):
            assert data == (folder / path).read_bytes(), path
    assert json.loads(final["funlora.json"]) == json.loads((folder / "funlora.json").read_text())
    card = ModelCard(final["README.md"].decode())
    assert card.data.library_name == "funlora-peft"
    assert "## Layer importance" in card.text and "![layer importance](importance.png)" in card.text
    assert "| `task_1` |" in card.text and "![samples](samples/after_task_1.png)" in card.text


def test_train_script_push_loads_back_from_the_hub_with_the_same_samples(pushed_training_run, monkeypatch):
    hub = pushed_training_run.hub
    hub.install(monkeypatch)
    pipe = load("someone/trained", tasks=["task_1"], cache_dir=hub.cache_dir)
    assert pipe.class_ids == [2, 3]
    assert not any(path.startswith("task_0/") for path in hub.requested_files())
    local = load(pushed_training_run.folder)
    assert torch.equal(sample(pipe, [3, 2, 3]), sample(local, [3, 2, 3]))


def test_train_script_select_layers_adapts_only_the_chosen_convs_after_task_0(pushed_training_run):
    folder = pushed_training_run.folder
    importance = json.loads((folder / "importance.json").read_text())
    assert importance["source"] == "probe" and importance["select_layers"] == "top_k=3"
    scores, selected = importance["scores"], importance["selected"]
    assert len(selected) == 3 and len(scores) > 10
    assert selected == [n for n in scores if n in selected]  # U-Net order
    assert min(abs(scores[n]) for n in selected) >= max(abs(v) for n, v in scores.items() if n not in selected)
    from safetensors.torch import load_file

    def adapted(task):
        keys = load_file(folder / task / "adapter_model.safetensors")
        return {k.split(".funlora_")[0].removeprefix("base_model.model.") for k in keys}

    assert adapted("task_1") == set(selected)
    assert adapted("task_0") == set(scores)  # task 0 adapts every conv
    assert json.loads((folder / "task_1" / "adapter_config.json").read_text())["target_modules"] == selected
    metrics = json.loads((folder / "metrics.json").read_text())
    per_class = [row["extra_parameters_per_class"] for row in metrics["tasks"]]
    assert per_class[1] < per_class[0] / 5
    assert (folder / "importance.png").stat().st_size > 5000


def test_train_script_resumes_a_selected_run_with_the_same_selection(pushed_training_run, tmp_path):
    from test_train import TINY, load_train_module

    train = load_train_module()
    out = tmp_path / "run"
    argv = [*TINY, "--report_to", "none", "--output_dir", str(out), "--select_layers", "top_k=3"]
    train.main(train.parse_args([*argv, "--interrupt_after_steps", "8"]))  # stopped in task 1 (checkpoint-6)
    assert (out / "importance.json").is_file() and not (out / "task_1").exists()
    saved = (out / "importance.json").read_bytes()
    moved = tmp_path / "importance.json"
    (out / "importance.json").rename(moved)
    with pytest.raises(SystemExit, match=r"importance.json is missing: the layers of tasks 1, 2, \.\.\. were chosen"):
        train.main(train.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    moved.rename(out / "importance.json")
    train.main(train.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert (out / "importance.json").read_bytes() == saved
    from safetensors.torch import load_file

    for task in ("task_0", "task_1"):
        resumed = load_file(out / task / "adapter_model.safetensors")
        reference = load_file(pushed_training_run.folder / task / "adapter_model.safetensors")
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
