"""The model card of a run: huggingface_hub's ModelCard with the tasks, the metrics, the samples and the usage."""

import huggingface_hub
from conftest import REPO, make_run
from huggingface_hub import ModelCard

from funlora_peft.hub import download_run
from funlora_peft.model_card import write_model_card


def test_model_card_metadata_and_body(hub, run_folder):
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
    assert hub.tree(REPO)["samples/after_task_2.png"] == (run_folder / "samples/after_task_2.png").read_bytes()
    # the card of the first commit describes task 0 only
    first = ModelCard(hub.tree(REPO, hub.pushed[0].oid)["README.md"].decode())
    assert "`task_0`" in first.text and "`task_1`" not in first.text and "after_task_0.png" in first.text


def test_write_model_card_in_a_run_folder(tmp_path, run_folder):
    make_run(tmp_path)  # no metrics.json, no samples
    card = ModelCard.load(write_model_card(tmp_path, license="mit"))
    assert card.data.library_name == "funlora-peft" and card.data.license == "mit"
    assert "## Tasks" in card.text and "## Metrics" not in card.text and "## Samples" not in card.text
    (tmp_path / "metrics.json").write_text("{not json")  # unreadable metrics are left out, not fatal
    assert "## Metrics" not in ModelCard.load(write_model_card(tmp_path)).text
