"""model_card.py: the adapter's README.md from a hand-made run: the Hub's header, the numbers, the usage snippet."""

from types import SimpleNamespace

import yaml

from config import PetConfig, TrainConfig
from data import Splits
from labels import OXFORD_PETS, PETS_TEMPLATE
from model_card import card_metadata, write_model_card

HISTORY = {
    "validation": [
        {"step": 5, "epoch": 1.0, "loss": 2.5, "breed_accuracy": 0.4},
        {"step": 10, "epoch": 2.0, "loss": 1.25, "breed_accuracy": 0.75},
    ]
}


def _card(tmp_path, repo_id=None):
    cfg = PetConfig(
        model_name_or_path="Salesforce/blip-image-captioning-base",
        dataset="timm/oxford-iiit-pet",
        caption_template=PETS_TEMPLATE,
    )
    args = TrainConfig(output_dir="outputs/blip-lora-pets", max_steps=10)
    splits = Splits([None] * 30, [None] * 7, [], OXFORD_PETS)
    state = SimpleNamespace(global_step=10, epoch=2.0)
    path = tmp_path / "README.md"
    write_model_card(str(path), cfg, args, splits, HISTORY, 0.75, 1234567, state, repo_id=repo_id)
    return path.read_text(), card_metadata(cfg, args, 0.75)


def test_card_fills_the_template_with_the_runs_numbers(tmp_path):
    text, meta = _card(tmp_path)
    assert yaml.safe_load(text.split("---\n")[1]) == yaml.safe_load(meta.to_yaml())
    assert "| 5 | 1.00 | 2.5000 | 0.400 |\n| 10 | 2.00 | 1.2500 | 0.750 |\n" in text
    assert "**0.750**" in text and "1,234,567 trainable parameters" in text
    assert "10 optimizer steps (--max_steps 10, 2.00 epochs)" in text and "30 training and 7 validation images" in text
    assert (
        "[Salesforce/blip-image-captioning-base](https://huggingface.co/Salesforce/blip-image-captioning-base)" in text
    )
    assert 'adapter = "outputs/blip-lora-pets"' in text
    assert "{{" not in text and "{#" not in text and text.endswith("```\n")  # every field filled, no template left


def test_card_snippet_loads_from_the_hub_repo_when_given(tmp_path):
    text, _ = _card(tmp_path, repo_id="someone/blip-lora-pets")
    assert 'adapter = "someone/blip-lora-pets"' in text and '"outputs/blip-lora-pets"' not in text


def test_card_names_the_lora_variant_and_early_stopping(tmp_path):
    cfg = PetConfig(model_name_or_path="m", dataset="timm/oxford-iiit-pet", caption_template=PETS_TEMPLATE)
    args = TrainConfig(output_dir="outputs/x", num_train_epochs=5, early_stopping_patience=2)
    splits = Splits([None] * 30, [None] * 7, [], OXFORD_PETS)
    path = tmp_path / "README.md"
    for state, says in [
        (SimpleNamespace(global_step=6, epoch=3.0, max_steps=10), "stopped early at epoch 3.00: 2 evaluations"),
        (SimpleNamespace(global_step=10, epoch=5.0, max_steps=10), "with early stopping after 2 evaluations"),
    ]:
        write_model_card(str(path), cfg, args, splits, HISTORY, 0.75, 1, state, variant="DoRA + rsLoRA")
        text = path.read_text()
        assert says in text and "without a better validation breed accuracy" in text
        assert "**Adapter**: DoRA + rsLoRA, r=32, alpha=64" in text
        tags = yaml.safe_load(text.split("---\n")[1])["tags"]
        assert "dora" in tags and "rslora" in tags
    _, meta = _card(tmp_path)
    assert "dora" not in meta.tags and "rslora" not in meta.tags  # plain LoRA
