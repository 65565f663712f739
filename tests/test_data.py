"""data.py: data sources and their label sets, annotation files, images (hostile ones too), the collator, the demo."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from config import PetConfig
from data import BadImage, CaptionCollator, CaptionDataset, Record, load_image, load_splits, stratified_split
from demo import REAL_PROCESSOR_DIR, write_synthetic_pets
from helpers import hostile_images, pngs, saved_dataset
from labels import BREEDS, OXFORD_PETS, PETS_TEMPLATE, SPECIES
from model import load_processor
from run_io import UserError

TEMPLATE = PETS_TEMPLATE


@pytest.fixture(scope="module")
def small_pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    return write_synthetic_pets(str(root), breeds=[0, 1, 2, 5, 23], trainval_per_breed=6, test_per_breed=3, size=48)


def test_official_layout_records(small_pets):
    splits = load_splits(small_pets, val_fraction=0.2, seed=1)
    assert len(splits["test"]) == 15 and len(splits["train"]) + len(splits["validation"]) == 30
    # stratified: every breed in validation, none shared with train
    assert {r.label for r in splits["validation"]} == {0, 1, 2, 5, 23}
    assert not {r.image_id for r in splits["train"]} & {r.image_id for r in splits["validation"]}
    for r in splits["test"]:
        assert BREEDS[r.label] == r.image_id.rsplit("_", 1)[0]  # label from list.txt matches the file name
        assert r.trimap and os.path.isfile(r.trimap)
    # the split is seeded
    again = load_splits(small_pets, val_fraction=0.2, seed=1)
    assert [r.image_id for r in again["validation"]] == [r.image_id for r in splits["validation"]]


def _as_hf(records, label_as_string):
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    rows = {"image": [r.source for r in records], "image_id": [r.image_id for r in records]}
    if label_as_string:  # pcuenq/oxford-pets: breed name as a string
        rows["label"] = [BREEDS[r.label] for r in records]
        features = Features({"image": ImageFeature(), "image_id": Value("string"), "label": Value("string")})
    else:  # timm/oxford-iiit-pet: ClassLabel with lower-case snake names
        rows["label"] = [r.label for r in records]
        features = Features(
            {
                "image": ImageFeature(),
                "image_id": Value("string"),
                "label": ClassLabel(names=[b.lower() for b in BREEDS]),
            }
        )
    return Dataset.from_dict(rows, features=features)


def _key(splits):
    return {k: sorted((r.image_id, r.label) for r in splits[k]) for k in ("train", "validation", "test")}


def test_every_source_gives_the_same_records(small_pets, tmp_path):
    from datasets import DatasetDict

    official = load_splits(small_pets, 0.2, seed=3)
    raw = {"train": official["train"] + official["validation"], "test": official["test"]}
    # save_to_disk folder
    disk = tmp_path / "disk"
    DatasetDict({k: _as_hf(v, False) for k, v in raw.items()}).save_to_disk(str(disk))
    from_disk = load_splits(str(disk), 0.2, seed=3)
    # a Hub-style repository of parquet files (what load_dataset(<hub id>) reads), string labels
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    for k, v in raw.items():
        _as_hf(v, True).to_parquet(str(hub / "data" / f"{k}-00000-of-00001.parquet"))
    from_hub = load_splits(str(hub), 0.2, seed=3)
    assert _key(from_disk) == _key(official) == _key(from_hub)
    # and the same pixels
    a = next(r for r in official["test"] if r.image_id == from_hub["test"][0].image_id)
    assert np.array_equal(np.asarray(load_image(a)), np.asarray(load_image(from_hub["test"][0])))


def test_single_split_source_holds_out_a_stratified_test_split(small_pets, tmp_path):
    official = load_splits(small_pets, 0.0, seed=0)
    everything = official["train"] + official["test"]
    _as_hf(everything, True).save_to_disk(str(tmp_path / "one"))
    splits = load_splits(str(tmp_path / "one"), 0.2, seed=0)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == len(everything)
    assert {r.label for r in splits["test"]} == {r.label for r in everything}
    assert abs(len(splits["test"]) - len(everything) / 2) <= 5


def test_classes_an_adapter_was_not_trained_on_are_a_clear_error(tmp_path):
    paths = pngs(tmp_path, [f"{k}.png" for k in range(4)])
    data = saved_dataset(str(tmp_path / "hf"), {"train": {"image": paths, "label": ["labrador", "beagle"] * 2}})
    assert load_splits(data).labels.names == ("beagle", "labrador")  # its own two classes, sorted
    with pytest.raises(UserError, match="not among the 37 Oxford-IIIT Pet breeds.*'labrador'"):
        load_splits(data, labels=OXFORD_PETS)


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(UserError, match="--demo"):
        load_splits("someone/no-such-pets")


def test_stratified_split_holds_out_each_breed():
    recs = [Record(f"{b}_{i}", b, None) for b in range(5) for i in range(20)]
    rest, held = stratified_split(recs, 0.1, seed=0)
    assert len(held) == 10 and all(sum(r.label == b for r in held) == 2 for b in range(5))


def _img_record(tmp_path, name, image=None, raw=None):
    path = tmp_path / f"{name}.jpg"
    if raw is not None:
        path.write_bytes(raw)
    else:
        fmt = "PNG" if image.mode in ("RGBA", "P", "LA") else "JPEG"
        image.save(path, format=fmt)
    return Record(name, 0, str(path))


def test_odd_images_become_rgb_and_broken_ones_are_reported(tmp_path):
    rgb = Image.new("RGB", (20, 10), (200, 30, 40))
    gray = _img_record(tmp_path, "gray", rgb.convert("L"))
    rgba_img = rgb.convert("RGBA")
    rgba_img.putpixel((0, 0), (0, 0, 0, 0))  # a transparent pixel is shown white, not black
    rgba = _img_record(tmp_path, "rgba", rgba_img)
    palette = _img_record(tmp_path, "palette", rgb.convert("P"))
    broken = _img_record(tmp_path, "broken", raw=b"\xff\xd8\xff\xe0 not really a jpeg")
    for rec in (gray, rgba, palette):
        img = load_image(rec)
        assert img.mode == "RGB" and img.size == (20, 10)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(palette).getpixel((5, 5)) == rgb.convert("P").convert("RGB").getpixel((5, 5))
    with pytest.raises(BadImage, match="broken"):
        load_image(broken)


def test_broken_image_never_enters_a_batch(tmp_path, tiny_assets):
    processor = load_processor(tiny_assets[0])
    good = [_img_record(tmp_path, f"ok{i}", Image.new("RGB", (30, 30), (i * 40, 0, 0))) for i in range(3)]
    broken = _img_record(tmp_path, "broken", raw=b"")
    for r, label in zip(good, (1, 2, 3)):
        r.label = label
    records = [good[0], broken, good[1], good[2]]
    train = CaptionDataset(records, processor.image_processor, OXFORD_PETS, TEMPLATE)
    items = [train[i] for i in range(len(train))]
    assert list(train.bad_images) == ["broken"]
    assert [it["label"] for it in items] == [1, 2, 2, 3]  # the broken one is replaced by the next
    evaluation = CaptionDataset(records, processor.image_processor, OXFORD_PETS, TEMPLATE, substitute_bad=False)
    batch = CaptionCollator(processor.tokenizer, processor.tokenizer.bos_token_id)([evaluation[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 3


def test_collator_pads_to_longest_masks_padding_and_starts_with_bos(tiny_assets):
    processor = load_processor(tiny_assets[0])
    tok = processor.tokenizer
    collate = CaptionCollator(tok, tok.bos_token_id)
    captions = [OXFORD_PETS.caption(BREEDS.index("pug"), TEMPLATE), OXFORD_PETS.caption(2, TEMPLATE)]
    items = [{"pixel_values": torch.zeros(3, 64, 64), "caption": c, "label": 0} for c in captions]
    batch = collate(items)
    lengths = [len(tok(c)["input_ids"]) for c in captions]
    assert batch["input_ids"].shape == (2, max(lengths)) and max(lengths) < 512
    assert (batch["input_ids"][:, 0] == tok.convert_tokens_to_ids("[DEC]")).all()
    short = int(np.argmin(lengths))
    assert (batch["labels"][short, lengths[short] :] == -100).all()
    assert (batch["labels"][short, : lengths[short]] != -100).all()
    # labels equal the input ids wherever they are not padding (the model shifts them itself)
    keep = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][keep], batch["input_ids"][keep])
    assert batch["input_ids"][short, lengths[short] - 1] == tok.sep_token_id


@pytest.mark.slow
def test_demo_processor_tokenises_breeds_as_the_real_checkpoint(demo_assets):
    """The demo runs on the real tokenizer: its saved processor splits breed names as the fixture's files do."""
    from transformers import BertTokenizer

    fixture = REAL_PROCESSOR_DIR
    real = BertTokenizer.from_pretrained(fixture)  # the files alone, not through the project's loader
    demo = load_processor(demo_assets[0]).tokenizer
    assert demo.tokenize("abyssinian") == real.tokenize("abyssinian") == ["abyss", "##inian"]
    for text in (OXFORD_PETS.caption(BREEDS.index("shiba_inu"), TEMPLATE), "a photo of a cat."):
        assert demo(text)["input_ids"] == real(text)["input_ids"]
    # plus BLIP's [DEC] and [ENC] after the 30,522 real entries, and a model with that vocabulary
    assert len(real) == 30522 and len(demo) == 30524
    assert demo.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert json.load(open(os.path.join(demo_assets[0], "config.json")))["text_config"]["vocab_size"] == 30524


def _fake_demo_builders(monkeypatch):
    """demo's two builders replaced by quick fakes that record each build (the real pre-training takes a minute)."""
    import demo

    built = {"base": [], "pets": []}

    def fake_pretrain(out, template, recipe=None, show_progress=True):
        built["base"].append(out)
        open(os.path.join(out, "config.json"), "w").write("{}")
        json.dump({**demo.DEMO_BASE_RECIPE, "template": template}, open(os.path.join(out, demo.RECIPE_FILE), "w"))
        return out

    def fake_pets(root, breeds):
        built["pets"].append(root)
        os.makedirs(os.path.join(root, "annotations"))
        open(os.path.join(root, "annotations", "list.txt"), "w").close()

    monkeypatch.setattr(demo, "pretrain_demo_blip", fake_pretrain)
    monkeypatch.setattr(demo, "write_synthetic_pets", fake_pets)
    return built


def test_a_demo_base_of_another_recipe_is_rebuilt_and_a_current_one_reused(tmp_path, monkeypatch):
    """An old random tiny-blip (no recipe file) or one built by another recipe is rebuilt; a current one is kept."""
    import demo

    built = _fake_demo_builders(monkeypatch)["base"]
    base = tmp_path / "tiny-blip"
    base.mkdir()
    (base / "config.json").write_text('{"random": true}')  # as the random demo of earlier versions left it
    model_dir = demo.prepare_demo_base(str(tmp_path), TEMPLATE)
    demo.prepare_demo_data(str(tmp_path))
    assert len(built) == 1 and model_dir == str(base) and json.loads((base / "config.json").read_text()) == {}
    demo.prepare_demo_base(str(tmp_path), TEMPLATE)
    assert len(built) == 1  # reused
    recipe = json.loads((base / demo.RECIPE_FILE).read_text())
    (base / demo.RECIPE_FILE).write_text(json.dumps({**recipe, "recipe": recipe["recipe"] - 1}))
    demo.prepare_demo_base(str(tmp_path), TEMPLATE)
    assert len(built) == 2 and demo.is_current_base(str(base), TEMPLATE)
    assert not demo.is_current_base(str(base), "A {breed}.")  # another template: its words were not pre-trained
    assert sorted(os.listdir(tmp_path)) == ["pets", "tiny-blip"]  # no temporary folder left behind
    weights = (base / "config.json").read_text()
    other = demo.prepare_demo_base(str(tmp_path), "A {breed}.")  # another template: a base of its own, beside
    assert len(built) == 3 and other != str(base) and os.path.basename(other).startswith("tiny-blip-")
    assert demo.is_current_base(str(base), TEMPLATE) and (base / "config.json").read_text() == weights


def test_demo_pets_drawn_by_another_version_are_redrawn_and_current_ones_reused(tmp_path, monkeypatch):
    """A pets folder with no drawing record (drawn before the record existed) or another one is redrawn."""
    import demo

    built = _fake_demo_builders(monkeypatch)["pets"]
    pets = tmp_path / "pets"
    (pets / "annotations").mkdir(parents=True)
    (pets / "annotations" / "list.txt").write_text("# drawn by an earlier version\n")
    assert demo.prepare_demo_data(str(tmp_path)) == str(pets)
    assert len(built) == 1 and (pets / "annotations" / "list.txt").read_text() == ""
    assert json.loads((pets / demo.DATA_FILE).read_text()) == demo.DEMO_DATA_RECIPE
    demo.prepare_demo_data(str(tmp_path))
    assert len(built) == 1  # reused
    (pets / demo.DATA_FILE).write_text(json.dumps({**demo.DEMO_DATA_RECIPE, "data": demo.DEMO_DATA_RECIPE["data"] - 1}))
    demo.prepare_demo_data(str(tmp_path))
    assert len(built) == 2 and demo.data_drawn_by(str(pets)) == demo.DEMO_DATA_RECIPE
    # the base records the drawing too: its pre-training images are drawn by the same code
    assert demo.DEMO_BASE_RECIPE["data"] == demo.DEMO_DATA_RECIPE["data"]
    assert sorted(os.listdir(tmp_path)) == ["pets"]


def test_demo_assets_given_on_the_command_line_are_not_built(tmp_path, monkeypatch):
    """--demo with --model_name_or_path and --dataset builds nothing under DEMO_DIR (tests pass both)."""
    import demo

    built = _fake_demo_builders(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = PetConfig(demo=True, model_name_or_path="given-model", dataset="given-pets")
    demo.use_demo_assets(cfg)
    assert (cfg.model_name_or_path, cfg.dataset) == ("given-model", "given-pets")
    assert built == {"base": [], "pets": []} and os.listdir(tmp_path) == []
    cfg = PetConfig(demo=True, dataset="given-pets")
    demo.use_demo_assets(cfg)
    assert cfg.model_name_or_path.endswith("tiny-blip") and len(built["base"]) == 1 and built["pets"] == []


def test_synthetic_species_differ_in_shape_not_only_ears():
    """Dogs stand long on four legs, cats sit upright: the pet mask's bounding box is wider than tall for
    every dog and taller than wide for every cat, whichever way it faces."""
    import random

    from demo import _draw_pet

    rng = random.Random(3)
    for label in (0, 1, 3, 5, 7, 20, 24):  # cats and dogs, 37 breeds' pre-training looks included
        for _ in range(6):
            _, mask = _draw_pet(label, 96, rng)
            ys, xs = np.nonzero(np.asarray(mask))
            width, height = xs.max() - xs.min(), ys.max() - ys.min()
            assert (width > 1.2 * height) if SPECIES[label] == "dog" else (height > 1.2 * width), (label, width, height)


def test_synthetic_breeds_differ_visibly(small_pets):
    # mean colour inside the pet mask differs between breeds far more than within one
    def pet_colour(name):
        img = np.asarray(Image.open(os.path.join(small_pets, "images", f"{name}.jpg")), dtype=float)
        tri = np.asarray(Image.open(os.path.join(small_pets, "annotations", "trimaps", f"{name}.png")))
        assert set(np.unique(tri)) <= {1, 2, 3} and (tri == 1).mean() > 0.05
        return img[tri == 1].mean(0)

    a1, a2, b1 = pet_colour("Abyssinian_1"), pet_colour("Abyssinian_2"), pet_colour("american_bulldog_1")
    assert np.linalg.norm(a1 - b1) > 3 * np.linalg.norm(a1 - a2)


# ---------------------------------------------------------------------------
# Hostile image files


@pytest.mark.parametrize(
    "case",
    [
        "ok",
        "zero_byte",
        "truncated_jpeg",
        "text_as_jpg",
        "png_named_jpg",
        "cmyk_jpeg",
        "16bit_png",
        "palette",
        "la",
        "1x1",
        "exif_rotated",
        "decompression_bomb",
    ],
)
def test_hostile_image(case, tmp_path):
    path, expected = hostile_images(str(tmp_path))[case]
    record = Record(case, 0, path)
    if expected is None:
        with pytest.raises(BadImage, match=case):
            load_image(record)
    else:
        img = load_image(record)
        assert img.mode == "RGB" and img.size == expected


def test_exif_rotation_is_applied(tmp_path):
    path, _ = hostile_images(str(tmp_path))["exif_rotated"]
    img = np.asarray(load_image(Record("x", 0, path)))
    # orientation 6 = rotate 90 deg clockwise: the stored left strip ends up on top
    assert img[2, 10, 2] > 200 and img[-3, 10, 0] > 200


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    path, _ = hostile_images(str(tmp_path))["16bit_png"]
    arr = np.asarray(load_image(Record("x", 0, path)))[..., 0]
    assert arr.min() == 0 and arr.max() == 255  # scaled, not clipped to white


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_image_over_the_pixel_limit_but_under_twice_it_is_bad(tmp_path, monkeypatch, mode):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that (89-179 Mpx by default), and it checks in Image.open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new(mode, (40, 40)).save(tmp_path / "big.png")  # 1,600 pixels: 1.6x the limit
    with pytest.raises(BadImage, match="DecompressionBomb"):
        load_image(Record("big", 0, str(tmp_path / "big.png")))
    Image.new("RGB", (30, 30)).save(tmp_path / "ok.png")  # 900 pixels: under it
    assert load_image(Record("ok", 0, str(tmp_path / "ok.png"))).size == (30, 30)


# ---------------------------------------------------------------------------
# Annotations in the official layout


def test_missing_list_txt_is_a_clear_error(pets):
    os.remove(os.path.join(pets, "annotations", "list.txt"))
    with pytest.raises(UserError, match="list.txt is missing"):
        load_splits(pets)


def test_bad_annotation_lines_are_skipped_and_counted(pets, caplog):
    path = os.path.join(pets, "annotations", "trainval.txt")
    lines = open(path).read().splitlines()
    lines[0] = lines[0].split()[0]  # malformed: no class id
    lines[1] = f"{lines[1].split()[0]} 99 1 1"  # unknown class id
    lines.append("Abyssinian_999 1 1 1")  # listed, but the image is missing
    open(path, "w").write("\n".join(lines) + "\n")
    os.remove(os.path.join(pets, "annotations", "list.txt"))
    open(os.path.join(pets, "annotations", "list.txt"), "w").write("# header\n")
    shutil.copy(os.path.join(pets, "images", "Abyssinian_1.jpg"), os.path.join(pets, "images", "Abyssinian_500.jpg"))
    with caplog.at_level(logging.INFO):
        splits = load_splits(pets, 0.0)
    assert len(splits["train"]) == 8 - 2
    text = caplog.text
    assert "Skipped 2 malformed annotation lines, unknown class ids or unsafe names" in text
    assert "Skipped 1 listed images that are missing (first: Abyssinian_999)" in text
    assert "3 images are in neither trainval.txt nor test.txt" in text  # the two bad lines' images + the extra one


def test_test_images_listed_in_trainval_are_dropped_from_training(pets, caplog):
    with open(os.path.join(pets, "annotations", "test.txt")) as f:
        leaked = f.readline()
    with open(os.path.join(pets, "annotations", "trainval.txt"), "a") as f:
        f.write(leaked)
    with caplog.at_level(logging.WARNING):
        splits = load_splits(pets, 0.25)
    name = leaked.split()[0]
    assert name in {r.image_id for r in splits["test"]}
    assert name not in {r.image_id for r in splits["train"] + splits["validation"]}
    assert "Dropped 1 images from trainval that are also in the test split" in caplog.text


def test_unsafe_and_conflicting_annotation_names_are_skipped(pets, tmp_path, caplog):
    outside = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    path = os.path.join(pets, "annotations", "trainval.txt")
    lines = open(path).read().splitlines()
    first = lines[0].split()[0]
    lines += ["../../secret 1 1 1", f"{tmp_path}/secret 1 1 1", f"{first} 2 2 1"]  # the last: same name, other label
    open(path, "w").write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        splits = load_splits(pets, 0.0)
    ids = {r.image_id for r in splits["train"]}
    assert not any("secret" in i for i in ids) and first not in ids
    assert len(ids) == 8 - 1
    assert "Skipped 2 malformed annotation lines, unknown class ids or unsafe names" in caplog.text
    assert f"Skipped 1 images listed twice with different labels in trainval.txt (first: {first})" in caplog.text


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_annotation_files_in_other_encodings_are_read(pets, encoding):
    for name in ("list.txt", "trainval.txt", "test.txt"):
        path = os.path.join(pets, "annotations", name)
        text = open(path).read()
        if name == "list.txt":
            text = "# Liste des images, annot\u00e9e\n" + text
        open(path, "w", encoding=encoding).write(text)
    splits = load_splits(pets, 0.0)
    assert len(splits["train"]) == 8 and len(splits["test"]) == 4


def test_dataset_that_is_an_empty_folder_or_a_file_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(UserError, match="neither the official layout"):
        load_splits(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is a file"):
        load_splits(str(tmp_path / "file.txt"))


# ---------------------------------------------------------------------------
# save_to_disk data sets: labels, image columns, repeated file names, damaged folders


def _hf_pets(tmp_path, labels, images=None):
    """A save_to_disk DatasetDict with a ClassLabel column (train and test)."""
    import datasets

    png = str(tmp_path / "x.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["abyssinian", "beagle"])}
    )
    rows = {"image": images or [png] * len(labels), "label": labels}
    split = datasets.Dataset.from_dict(rows, features=features)
    path = str(tmp_path / "hf")
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(path)
    return path


def test_classlabel_minus_one_is_skipped_not_the_last_breed(tmp_path, caplog):
    path = _hf_pets(tmp_path, [0, -1, 1, -1])
    with caplog.at_level(logging.WARNING):
        splits = load_splits(path, 0.0)
    assert sorted(r.label for r in splits["test"]) == [0, 4]  # abyssinian, beagle; no Yorkshire Terrier (36)
    assert "Skipped 2 rows of split 'test' without a label" in caplog.text


def test_image_column_of_ints_is_one_line(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"image": [1, 2], "label": ["beagle", "pug"]})
    path = str(tmp_path / "ints")
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(path)
    with pytest.raises(UserError, match="'image' column .* not images"):
        load_splits(path)


def test_none_image_cell_is_a_skipped_bad_image(tmp_path):
    import datasets

    png = str(tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(png)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    split = datasets.Dataset.from_dict({"image": [png, None], "label": ["beagle", "pug"]}, features=features)
    path = str(tmp_path / "none")
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(path)
    records = load_splits(path, 0.0)["test"]
    assert load_image(records[0]).size == (8, 8)
    with pytest.raises(BadImage, match="holds NoneType"):
        load_image(records[1])


def test_leakage_check_tells_repeated_file_names_in_other_folders_apart(tmp_path, caplog):
    from data import load_splits

    train_paths = pngs(tmp_path, ["cats/1.png", "cats/2.png", "cats/3.png", "cats/4.png"])
    test_paths = pngs(tmp_path, ["dogs/1.png", "dogs/2.png"])
    data = saved_dataset(
        str(tmp_path / "hf"),
        {
            "train": {
                "image": train_paths + test_paths[:1],
                "path": train_paths + test_paths[:1],
                "label": ["abyssinian"] * 4 + ["beagle"],
            },  # dogs/1.png really is in both splits
            "test": {"image": test_paths, "path": test_paths, "label": ["beagle"] * 2},
        },
    )
    with caplog.at_level("WARNING"):
        splits = load_splits(data, 0.0)
    # cats/1.png and cats/2.png are not "also in the test split"; dogs/1.png (the one beagle) is
    assert sorted(r.label for r in splits["train"]) == [0] * 4
    assert sorted(r.identity for r in splits["train"]) == sorted(train_paths)
    assert "Dropped 1 images from trainval" in caplog.text


@pytest.mark.parametrize("damage", ["no_split_folders", "garbled_json", "truncated_arrow"])
def test_damaged_save_to_disk_folder_is_one_line(tmp_path, damage):
    import glob

    from data import load_splits

    paths = pngs(tmp_path, [f"{k}.png" for k in range(8)])
    data = saved_dataset(
        str(tmp_path / "hf"), {s: {"image": paths, "label": ["pug", "beagle"] * 4} for s in ("train", "test")}
    )
    if damage == "no_split_folders":  # a save killed after dataset_dict.json
        for split in ("train", "test"):
            shutil.rmtree(os.path.join(data, split))
    elif damage == "garbled_json":
        open(os.path.join(data, "dataset_dict.json"), "w").write('{"splits": ["train", "te')
    else:
        for arrow in glob.glob(os.path.join(data, "*", "*.arrow")):
            os.truncate(arrow, os.path.getsize(arrow) // 2)
    with pytest.raises(UserError, match="save_to_disk folder .* is incomplete or corrupt"):
        load_splits(data)


def test_demo_pretraining_runs_on_its_own_thread_count_whatever_the_callers(tmp_path, monkeypatch):
    """CPU matrix products split their sums by thread, so pre-training pins its thread count: bases built by
    callers on 1 and on 2 threads are bit-identical, and the caller's setting is put back."""
    from safetensors.torch import load_file

    import demo

    seen = []
    loss = demo._caption_loss
    monkeypatch.setattr(demo, "_caption_loss", lambda *a: seen.append(torch.get_num_threads()) or loss(*a))
    recipe = {**demo.DEMO_BASE_RECIPE, "hidden": 32, "images": 8, "steps": 3, "batch": 4, "threads": 2}
    before = torch.get_num_threads()
    weights = []
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            out = tmp_path / f"caller-{caller}"
            out.mkdir()
            demo.pretrain_demo_blip(str(out), TEMPLATE, recipe, show_progress=False)
            assert torch.get_num_threads() == caller
            weights.append(load_file(str(out / "model.safetensors")))
    finally:
        torch.set_num_threads(before)
    assert seen == [2] * 6
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((tmp_path / "caller-1" / demo.RECIPE_FILE).read_text())["threads"] == 2


def test_sampled_head_is_the_full_softmax_when_every_unused_token_is_drawn():
    """demo.SampledHead: with all unused tokens drawn (correction log 1 = 0) or negatives=None it is the full
    softmax's cross-entropy; with a few drawn, only the used and drawn rows get a gradient."""
    from types import SimpleNamespace

    from demo import SampledHead

    torch.manual_seed(0)
    head = SimpleNamespace(transform=torch.nn.Identity(), decoder=torch.nn.Linear(8, 50))
    hidden, targets = torch.randn(6, 8), torch.tensor([3, 7, 7, 20, 3, 41])
    full = torch.nn.functional.cross_entropy(head.decoder(hidden), targets)
    used = torch.tensor([3, 7, 20, 41, 7])
    assert SampledHead(used, 50, None).loss(head, hidden, targets).item() == pytest.approx(full.item(), rel=1e-6)
    assert SampledHead(used, 50, 46).loss(head, hidden, targets).item() == pytest.approx(full.item(), rel=1e-6)
    sampled = SampledHead(used, 50, 5)
    sampled.loss(head, hidden, targets).backward()
    rows = head.decoder.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist()
    assert set(used.tolist()) <= set(rows) and len(rows) == 4 + 5


# ---------------------------------------------------------------------------
# Other data sets: image folders, data files and their columns, held-out splits, label names


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    from demo import write_toy_birds

    return write_toy_birds(str(tmp_path_factory.mktemp("birds")), train_per_class=4, test_per_class=2, size=32)


def test_an_image_folder_with_split_folders_gives_readable_classes(birds):
    splits = load_splits(birds, 0.25, seed=0)
    assert splits.labels.names[:2] == ("Northern Cardinal", "Blue Jay") and len(splits.labels) == 6
    assert not splits.labels.groups and not splits.labels.is_pets
    assert len(splits.test) == 12 and len(splits.train) + len(splits.validation) == 24
    assert {r.label for r in splits.validation} == set(range(6))  # stratified
    cardinal = next(r for r in splits.test if r.label == 0)
    assert "001.Northern_Cardinal" in cardinal.identity and os.path.isabs(cardinal.identity)
    assert splits.labels.caption(1, splits.labels.default_template()) == "A photo of a Blue Jay."


def test_an_image_folder_without_split_folders_holds_out_a_stratified_half(tmp_path, caplog):
    from demo import write_toy_birds

    flat = write_toy_birds(str(tmp_path / "flat"), 4, 2, size=32, split_folders=False)
    with caplog.at_level("WARNING"):
        splits = load_splits(flat, 0.0, seed=0)
    assert "no 'test' split: holding out a stratified half" in caplog.text
    assert len(splits.test) == 18 and {r.label for r in splits.test} == set(range(6))


def test_empty_class_folders_are_counted_and_one_class_is_refused(tmp_path, caplog):
    pngs(str(tmp_path / "two"), ["Crow/1.png", "Crow/2.png", "Owl/1.png", "Owl/2.png"])
    (tmp_path / "two" / "Dodo").mkdir()
    with caplog.at_level("WARNING"):
        splits = load_splits(str(tmp_path / "two"), 0.0)
    assert splits.labels.names == ("Crow", "Owl") and "Left out 1 class folders without images (first: Dodo)" in (
        caplog.text
    )
    pngs(str(tmp_path / "one"), ["train/Crow/1.png", "train/Crow/2.png", "test/Crow/3.png"])
    with pytest.raises(UserError, match="at least two"):
        load_splits(str(tmp_path / "one"))


def _parquet(folder, splits: dict, features=None):
    """A Hub-style repository of parquet files (data/<split>-00000-of-00001.parquet)."""
    import datasets

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for name, columns in splits.items():
        split = datasets.Dataset.from_dict(columns, features=features)
        split.to_parquet(os.path.join(folder, "data", f"{name}-00000-of-00001.parquet"))
    return str(folder)


def _features(label=None, extra=None):
    import datasets

    return datasets.Features({"img": datasets.Image(), "species": label or datasets.Value("string"), **(extra or {})})


def test_data_files_with_other_columns_and_a_named_test_split(tmp_path):
    """Food-101 on the Hub: splits train and validation, the validation split is the official test set."""
    paths = pngs(str(tmp_path / "png"), [f"{k}.png" for k in range(12)])
    names = ["apple_pie", "baby_back_ribs", "beignets"] * 4
    data = _parquet(
        tmp_path / "food",
        {"train": {"img": paths[:9], "species": names[:9]}, "validation": {"img": paths[9:], "species": names[9:]}},
        _features(),
    )
    with pytest.raises(UserError, match="no label column .* among \\['species'\\]: pass --label_column_name"):
        load_splits(data, test_split="validation")  # a column of strings is a label column when named
    splits = load_splits(data, 0.34, seed=1, label_column="species", test_split="validation")
    assert splits.labels.names == ("apple pie", "baby back ribs", "beignets")
    assert len(splits.test) == 3 and len(splits.train) + len(splits.validation) == 9  # validation: from train
    with pytest.raises(UserError, match="--test_split 'testing' is not a split.*'train', 'validation'"):
        load_splits(data, label_column="species", test_split="testing")


def test_a_validation_split_of_the_data_set_is_used_as_it_is(birds, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(birds, root)
    shutil.copytree(root / "test", root / "validation")
    splits = load_splits(str(root), 0.5)
    assert len(splits.validation) == 12 and len(splits.train) == 24  # nothing moved out of train


def test_columns_are_found_or_named_in_one_line(tmp_path):
    import datasets

    paths = pngs(str(tmp_path / "png"), [f"{k}.png" for k in range(4)])
    classes = datasets.ClassLabel(names=["Crow", "Owl"])
    two_images = _parquet(
        tmp_path / "a",
        {"train": {"img": paths, "other": paths, "species": [0, 1, 0, 1]}},
        _features(classes, {"other": datasets.Image()}),
    )
    with pytest.raises(UserError, match="2 columns hold images \\(img, other\\): pass --image_column_name"):
        load_splits(two_images)
    assert load_splits(two_images, image_column="other").labels.names == ("Crow", "Owl")
    two_labels = _parquet(
        tmp_path / "b",
        {"train": {"img": paths, "species": [0, 1, 0, 1], "size": [1, 0, 1, 0]}},
        _features(classes, {"size": datasets.ClassLabel(names=["small", "large"])}),
    )
    with pytest.raises(UserError, match="several columns could hold the labels \\(species, size\\)"):
        load_splits(two_labels)
    assert load_splits(two_labels, label_column="size").labels.names == ("small", "large")
    floats = _parquet(
        tmp_path / "c", {"train": {"img": paths, "species": [0.5, 1.5, 0.5, 1.5]}}, _features(datasets.Value("float32"))
    )
    with pytest.raises(UserError, match="holds Value\\(.*float32.*\\).*not labels"):
        load_splits(floats, label_column="species")
    with pytest.raises(UserError, match="--label_column_name 'kind' is not a column"):
        load_splits(floats, label_column="kind")


def test_integer_labels_without_names_are_numbered_with_a_warning(tmp_path, caplog):
    paths = pngs(str(tmp_path / "png"), [f"{k}.png" for k in range(4)])
    data = saved_dataset(str(tmp_path / "ints"), {"train": {"image": paths, "label": [3, 7, 3, 7]}})
    with caplog.at_level("WARNING"):
        splits = load_splits(data)
    assert splits.labels.names == ("3", "7") and "plain integers" in caplog.text


def test_label_names_file_names_the_classes(birds, tmp_path):
    path = tmp_path / "names.csv"
    path.write_text("label,name,group\n" + "".join(f"{b[0]},{b[0].split('.')[1]} bird,songbird\n" for b in _birds()))
    splits = load_splits(birds, label_names=str(path))
    assert splits.labels.names[0] == "Northern_Cardinal bird" and splits.labels.groups[0] == "songbird"


def _birds():
    from demo import TOY_BIRDS

    return TOY_BIRDS
