"""labels.py: readable class names, the built-in pets label set (the same answers as before label sets), reading
a class out of a caption, templates, and --label_names files."""

import json
import re

import pytest

from labels import (
    BREED_NAMES,
    BREEDS,
    GENERIC_TEMPLATE,
    OXFORD_PETS,
    PETS_TEMPLATE,
    SPECIES,
    UNKNOWN,
    LabelSet,
    from_class_names,
    readable_name,
    with_label_names,
)
from run_io import UserError


def test_breed_table():
    assert len(BREEDS) == 37 and SPECIES.count("cat") == 12 and SPECIES.count("dog") == 25
    assert BREED_NAMES[2] == "American Pit Bull Terrier" and BREED_NAMES[0] == "Abyssinian"
    assert SPECIES[BREEDS.index("Sphynx")] == "cat" and SPECIES[BREEDS.index("pug")] == "dog"
    for spelling in ("american_pit_bull_terrier", "American Pit Bull Terrier", "AMERICAN-PIT-BULL-TERRIER", 2):
        assert OXFORD_PETS.index(spelling) == 2
    with pytest.raises(ValueError):
        OXFORD_PETS.index("labrador")


def test_caption_template_uses_an_before_vowels():
    assert OXFORD_PETS.caption(0, PETS_TEMPLATE) == "A photo of an Abyssinian, a type of pet."
    egyptian, pug = BREEDS.index("Egyptian_Mau"), BREEDS.index("pug")
    assert OXFORD_PETS.caption(egyptian, PETS_TEMPLATE) == "A photo of an Egyptian Mau, a type of pet."
    assert OXFORD_PETS.caption(pug, "A {label} ({group}).") == "A Pug (dog)."


@pytest.mark.parametrize(
    "raw,readable",
    [
        ("001.Black_footed_Albatross", "Black footed Albatross"),  # CUB-200-2011's numbered folders
        ("n02085620-Chihuahua", "Chihuahua"),  # Stanford Dogs' WordNet ids
        ("n02085782-Japanese_spaniel", "Japanese spaniel"),
        ("apple_pie", "apple pie"),  # Food-101
        ("737-700", "737-700"),  # FGVC-Aircraft variants are readable as they are
        ("Cessna 172", "Cessna 172"),
        ("1.5_litre", "1.5 litre"),  # a number, not a release prefix
        ("  Great   Grey_Owl ", "Great Grey Owl"),
    ],
)
def test_readable_names(raw, readable):
    assert readable_name(raw) == readable


def test_class_names_that_are_all_breeds_give_the_37_breed_set():
    assert from_class_names(["abyssinian", "beagle"]) is OXFORD_PETS  # timm's snake_case names
    assert from_class_names(["Abyssinian", "american_bulldog"]) is OXFORD_PETS  # pcuenq's strings
    birds = from_class_names(["001.Black_footed_Albatross", "002.Laysan_Albatross", "beagle"])
    assert birds.names == ("Black footed Albatross", "Laysan Albatross", "beagle") and not birds.groups
    assert birds.index("001.Black_footed_Albatross") == 0 and birds.index("laysan albatross") == 1
    twins = from_class_names(["001.Crow", "002.Crow"])  # read the same once cleaned: kept apart
    assert twins.names == ("001.Crow", "002.Crow")


def test_a_caption_names_the_longest_matching_class_as_whole_words():
    cars = LabelSet(["Cessna 172", "Cessna 172 Skyhawk", "737-700", "Crème brûlée"], ["a", "b", "c", "d"])
    assert cars.from_caption("a cessna 172 skyhawk on the runway") == 1  # the longest name wins
    assert cars.from_caption("A photo of a 737-700.") == 2
    assert cars.from_caption("a 737 700s") == 2  # plural, and the hyphen as the tokenizer splits it
    assert cars.from_caption("a creme brulee") == 3  # BLIP's uncased tokenizer drops the accents
    assert cars.from_caption("a cessna 1720") == UNKNOWN  # whole words only
    pets = OXFORD_PETS
    assert pets.from_caption("a pugnacious dog") == UNKNOWN and pets.group_from_caption("a pugnacious dog") == "dog"
    assert pets.from_caption("an american pit bull terrier and a pit bull") == BREEDS.index("american_pit_bull_terrier")
    assert pets.group_from_caption("a cat and a dog") is None


def test_templates_must_name_the_class_and_group_needs_groups():
    birds = LabelSet(["Crow", "Owl"], ["crow", "owl"])
    for bad in ("A photo.", "A {colour} {label}.", "A {label", "A {group} bird."):
        with pytest.raises(UserError, match="--caption_template"):
            birds.check_template(bad)
    with pytest.raises(UserError, match="has no groups"):
        birds.check_template("A {label}, a {group}.")
    OXFORD_PETS.check_template("A {label}, a {group}.")
    assert birds.default_template() == GENERIC_TEMPLATE and "pet" not in GENERIC_TEMPLATE
    assert OXFORD_PETS.default_template() == PETS_TEMPLATE


def test_label_names_files_rename_alias_and_group(tmp_path):
    birds = from_class_names(["001.Crow", "002.Great_Grey_Owl", "003.Snowy_Owl"])
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"001.Crow": "American crow", "Great Grey Owl": {"aliases": ["lapland owl"]}}))
    named = with_label_names(birds, str(path))
    assert named.names == ("American crow", "Great Grey Owl", "Snowy Owl") and not named.groups
    assert named.from_caption("a lapland owl") == 1 and named.index("001.Crow") == 0
    csv_path = tmp_path / "names.csv"
    csv_path.write_text(
        "label,name,aliases,group\n001.Crow,Crow,raven|rook,corvid\n002.Great_Grey_Owl,,,owl\n"
        "003.Snowy_Owl,Snowy owl,,owl\n"
    )
    grouped = with_label_names(birds, str(csv_path))
    assert grouped.groups == ("corvid", "owl", "owl") and grouped.from_caption("a rook") == 0
    assert grouped.group_from_caption("an owl on a branch") == "owl"
    assert grouped.caption(2, "A {label}, an {group}.") == "A Snowy owl, an owl."


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('{"004.Dodo": "Dodo"}', "json", "classes the data set does not have"),
        ('{"001.Crow": "Owl", "002.Great_Grey_Owl": "Owl"}', "json", "two classes the name 'Owl'"),
        ('["Crow"]', "json", "must be an object"),
        ('{"001.Crow": 7}', "json", "non-empty string"),
        ("{not json", "json", "cannot be read"),
        ("label,display\n001.Crow,Crow\n", "csv", "columns label and name"),
        ("label,name,group\n001.Crow,Crow,corvid\n", "csv", "groups to some classes but not"),
        ("label,name\n001.Crow,Crow\n001.Crow,Raven\n", "csv", "listed twice"),
    ],
)
def test_bad_label_names_files_are_one_line(tmp_path, content, suffix, message):
    birds = from_class_names(["001.Crow", "002.Great_Grey_Owl"])
    path = tmp_path / f"names.{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        with_label_names(birds, str(path))


def test_a_label_set_survives_its_json_and_pets_stays_the_built_in_one(tmp_path):
    birds = with_label_names(from_class_names(["001.Crow", "002.Owl"]), _csv(tmp_path))
    assert LabelSet.from_json(json.loads(json.dumps(birds.to_json())), "x") == birds
    assert LabelSet.from_json(OXFORD_PETS.to_json(), "x") is OXFORD_PETS
    with pytest.raises(UserError, match="not a label set"):
        LabelSet.from_json({"names": ["a"]}, "labels.json")


def _csv(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("label,name,aliases,group\n001.Crow,Crow,raven,corvid\n002.Owl,Owl,,owl\n")
    return str(path)


# ---------------------------------------------------------------------------
# A data set that is not pets, end to end


def test_toy_birds_train_evaluate_and_explain_with_no_data_flags(tiny_assets, tmp_path):
    """An image folder of 6 bird species: train.py learns its classes; evaluate.py and explainability.py take
    the adapter alone and speak of birds by their readable names, never of pets."""
    import pandas as pd

    import evaluate
    import explainability
    import train
    from demo import write_toy_birds

    birds = write_toy_birds(str(tmp_path / "birds"), train_per_class=4, test_per_class=2, size=32)
    adapter = str(tmp_path / "adapter")
    train.main(
        ["--model_name_or_path", tiny_assets[0], "--dataset", birds, "--output_dir", adapter, "--max_steps", "2",
         "--embedding_cache_dir", str(tmp_path / "cache"), "--max_new_tokens", "4", "--val_fraction", "0.25"]
    )  # fmt: skip
    run = json.load(open(f"{adapter}/run_config.json"))
    assert run["trained_on"]["labels"]["names"][0] == "Northern Cardinal"
    assert run["shared"]["caption_template"] == GENERIC_TEMPLATE
    assert "captions images as" in open(f"{adapter}/README.md").read()

    out = str(tmp_path / "eval")
    result = evaluate.main(["--adapter", adapter, "--output_dir", out, "--bootstrap_samples", "10"])
    assert result["metrics"]["num_samples"] == 12 and "species_accuracy" not in result["metrics"]["fine_tuned"]
    report = open(f"{out}/report.md").read()
    assert "Snowy Owl" in report and "class accuracy (caption names the class)" in report
    text = re.sub(r"\(\w+\.(png|csv)\)", "", report).lower()  # the files keep their names (per_breed_accuracy.png)
    assert "breed" not in text and " pet" not in text
    truth = pd.read_csv(f"{out}/predictions.csv")["true_breed"]
    assert set(truth) == {"Northern Cardinal", "Blue Jay", "American Goldfinch", "Common Raven", "Snowy Owl",
                          "Ruby throated Hummingbird"}  # fmt: skip

    explained = str(tmp_path / "explain")
    explainability.main(["--adapter", adapter, "--output_dir", explained, "--num_images", "2"])
    index = open(f"{explained}/index.md").read()
    assert "(true class: " in index and "breed" not in index

    with pytest.raises(UserError, match="not among the adapter's 6 classes"):  # an adapter on birds sees no pets
        evaluate.main(["--adapter", adapter, "--dataset", tiny_assets[1], "--output_dir", out])
