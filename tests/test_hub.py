"""Hub round trip with no network: push a run to a fake Hub (`fake_hub.FakeHub`), load some of its tasks back through
huggingface_hub's real download functions."""

import json
import re

import pytest
import torch
from conftest import REPO, TASKS, load_pipeline, make_run, sample_images
from fake_hub import FakeHub
from huggingface_hub import CommitOperationAdd

from funlora_peft.hub import push_to_hub


def test_push_makes_one_commit_per_task_each_a_complete_run(hub, run_folder):
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
        assert final[path] == (run_folder / path).read_bytes()
    assert json.loads(final["funlora.json"]) == json.loads((run_folder / "funlora.json").read_text())


def test_load_two_tasks_through_the_hub_fetches_only_them_and_samples_identically(hub, run_folder):
    pipe = load_pipeline(REPO, tasks=["task_0", "task_2"], cache_dir=hub.cache_dir)
    assert pipe.class_ids == [0, 1, 4]
    # not fetched: never requested, and absent from the snapshot the pipeline was loaded from
    requested = hub.requested_files()
    assert "task_0/adapter_model.safetensors" in requested and "backbone/config.json" in requested
    assert not any(path.startswith("task_1/") for path in requested)
    (snapshot,) = (hub.cache_dir / "models--someone--funlora-tiny" / "snapshots").iterdir()
    assert snapshot.name == hub.pushed[-1].oid
    assert sorted(p.name for p in snapshot.iterdir()) == ["backbone", "funlora.json", "task_0", "task_2"]
    # bit-identical samples to the run folder loaded locally, for mixed and single-class batches
    local = load_pipeline(run_folder, tasks=["task_0", "task_2"])
    full = load_pipeline(run_folder)
    for labels in ([4, 0, 1, 4], [1, 1]):
        got = sample_images(pipe, labels)
        assert torch.equal(got, sample_images(local, labels))
        assert torch.equal(got, sample_images(full, labels))


def test_revision_is_passed_through_everywhere(hub):
    after_task_1 = hub.pushed[1].oid
    pipe = load_pipeline(REPO, tasks=["task_1"], revision=after_task_1, cache_dir=hub.cache_dir)
    assert pipe.class_ids == [2, 3] and pipe.index.task_names == ["task_0", "task_1"]
    assert [call["revision"] for call in hub.requested] == [after_task_1, after_task_1]
    with pytest.raises(ValueError, match=r"`tasks` names \['task_2'\].*\['task_0', 'task_1'\]"):
        load_pipeline(REPO, tasks=["task_2"], revision=after_task_1, cache_dir=hub.cache_dir)
    with pytest.raises(ValueError, match="Could not get funlora.json of 'someone/funlora-tiny' \\(revision 'nope'\\)"):
        load_pipeline(REPO, revision="nope", cache_dir=hub.cache_dir)


def _commit(hub, path, data):
    hub.create_commit(REPO, [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)], commit_message="edit")


def test_tampered_adapter_on_the_hub_is_refused(hub):
    path = "task_1/adapter_model.safetensors"
    data = bytearray(hub.tree(REPO)[path])
    data[-1] ^= 0x01
    _commit(hub, path, bytes(data))  # a commit that changes the weights but not the index
    with pytest.raises(ValueError, match=r"task_1/adapter_model.safetensors: sha256 .* does not match"):
        load_pipeline(REPO, tasks=["task_0", "task_1"], cache_dir=hub.cache_dir)
    # the untouched tasks still load
    assert load_pipeline(REPO, tasks=["task_0", "task_2"], cache_dir=hub.cache_dir).class_ids == [0, 1, 4]


def test_unknown_format_version_on_the_hub_is_refused(hub):
    index = json.loads(hub.tree(REPO)["funlora.json"])
    _commit(hub, "funlora.json", json.dumps({**index, "format_version": 99}).encode())
    with pytest.raises(ValueError, match="unknown format_version 99"):
        load_pipeline(REPO, cache_dir=hub.cache_dir)
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


def test_push_some_tasks_adds_them_to_the_repo(tmp_path, run_folder):
    fake = FakeHub(tmp_path / "cache")
    push_to_hub(run_folder, REPO, tasks=["task_0", "task_1"], api=fake)
    push_to_hub(run_folder, REPO, tasks=["task_2"], api=fake)
    assert len(fake.commits) == 3
    # the backbone went with task_0: a later push adds its task only
    assert {p.split("/")[0] for p in fake.operations[2]} == {"task_2", "funlora.json", "README.md", "samples"}
    assert fake.commits[2].commit_message == "Upload task_2 (classes [4])"
    tree = fake.tree(REPO)
    assert (
        tree["backbone/diffusion_pytorch_model.safetensors"]
        == (run_folder / "backbone" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert json.loads(tree["funlora.json"]) == json.loads((run_folder / "funlora.json").read_text())
    # a repo started from a later task needs the backbone: include_backbone=True sends it
    other = FakeHub(tmp_path / "cache2")
    push_to_hub(run_folder, REPO, tasks=["task_2"], api=other, include_backbone=True)
    assert other.commits[0].commit_message == "Upload task_2 (classes [4]) and backbone"
    assert any(p.startswith("backbone/") for p in other.operations[0])


# -- CLI -----------------------------------------------------------------------------------------------------------


def test_push_to_a_branch_and_load_from_it(tmp_path, monkeypatch, run_folder):
    fake = FakeHub(tmp_path / "cache")
    fake.install(monkeypatch)
    push_to_hub(run_folder, REPO, tasks=["task_0"], api=fake, private=True)
    push_to_hub(run_folder, REPO, tasks=["task_1"], api=fake, revision="more")
    assert fake.repos[REPO]["private"] is True
    assert len(fake.tree(REPO, "main")) < len(fake.tree(REPO, "more"))
    pipe = load_pipeline(REPO, revision="more", cache_dir=fake.cache_dir)
    assert pipe.index.task_names == ["task_0", "task_1"] and pipe.class_ids == [0, 1, 2, 3]
    assert load_pipeline(REPO, cache_dir=fake.cache_dir).class_ids == [0, 1]


# ---------------------------------------------------------------------------------------------------------------------
# The training script's --push_to_hub, through the same fake Hub
