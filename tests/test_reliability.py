"""Issue 11, reliability round two: no silently wrong result, no lost result, no traceback.

In-process calls of the entry functions on small synthetic data; one tiny adapter (2 steps) per module.
"""

import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import explainability
import run_io
import train
import trainer
from config import EvalConfig, PetConfig, adapter_split_settings, parse_config
from data import BadImage, Record, load_image, load_splits
from demo import write_synthetic_pets
from embedding_cache import CachedEmbeddingDataset, EmbeddingCache, vision_fingerprint
from inference import image_embeddings
from model import load_base_model, load_lora_for_inference, load_processor
from run_io import UserError, locked_output_dir, staged_outputs

TRAIN_SEED = 7


@pytest.fixture(scope="module")
def tiny_adapter(demo_assets, tmp_path_factory):
    """A 2-step adapter trained with seed 7 and val_fraction 0.2 (not the defaults), with its checkpoint-2."""
    out = str(tmp_path_factory.mktemp("tiny") / "adapter")
    argv = _train_argv(demo_assets, out, tmp_path_factory.mktemp("cache"))
    train.main(argv)
    return out, argv


def _train_argv(demo_assets, out, cache):
    return ["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1], "--output_dir", out,
            "--max_steps", "2", "--seed", str(TRAIN_SEED), "--val_fraction", "0.2", "--embedding_cache_dir", str(cache)]


@pytest.fixture
def pets(tmp_path):
    return write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=4, test_per_breed=2, size=32)


# ---------------------------------------------------------------------------
# Options: checked before anything loads, one line each


def test_abbreviated_flags_are_refused():
    with pytest.raises(UserError, match="--model_name"):
        parse_config((PetConfig, EvalConfig), ["--model_name", "foo/bar"])


@pytest.mark.parametrize("argv,message", [
    (["--lora_r", "0"], "--lora_r must be at least 1"),
    (["--learning_rate", "-1"], "--learning_rate must be 0 or more"),
    (["--lora_dropout", "2"], "--lora_dropout must be in"),
    (["--lora_target_modules", ","], "names no module"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--seed", "-1"], "--seed must be in"),
    (["--caption_template", "{dog}"], "not a valid template"),
    (["--caption_template", "A pet."], "must contain {breed}"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be"),
    (["--num_train_epochs", "0"], "untrained adapter"),
    (["--max_steps", "0"], "--max_steps must be positive"),
    (["--val_fraction", "1.5"], "--val_fraction"),
])
def test_train_options_are_checked_first(argv, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_splits", lambda *a, **k: pytest.fail("loaded data before checking options"))
    with pytest.raises(UserError, match=message):
        train.main(["--model_name_or_path", "nobody/none", "--output_dir", str(tmp_path / "o"), *argv])


def test_huge_bootstrap_is_refused_before_loading(tmp_path):
    with pytest.raises(UserError, match="--bootstrap_samples must be 1-100000"):
        evaluate.parse_args(["--adapter", str(tmp_path / "none"), "--bootstrap_samples", "100000000"])


def test_train_refuses_output_dir_that_is_or_contains_the_base_model(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    for out in (base, tmp_path / "models"):
        with pytest.raises(UserError, match="base model folder"):
            train.parse_args(["--model_name_or_path", str(base), "--output_dir", str(out)])


def test_evaluate_and_explain_refuse_the_adapter_folder_as_output(tiny_adapter):
    adapter = tiny_adapter[0]
    before = open(os.path.join(adapter, "run_config.json")).read()
    with pytest.raises(UserError, match="is the adapter folder"):
        evaluate.parse_args(["--adapter", adapter, "--output_dir", adapter])
    with pytest.raises(UserError, match="is the adapter folder"):
        explainability.parse_args(["--adapter", adapter, "--output_dir", adapter + "/"])
    assert open(os.path.join(adapter, "run_config.json")).read() == before


def test_one_rule_for_the_base_model_and_data_of_evaluate_and_explain(tiny_adapter, demo_assets, tmp_path):
    adapter = tiny_adapter[0]
    trained_on = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
    other, other_data = str(tmp_path / "other"), str(tmp_path / "data")
    shutil.copytree(demo_assets[0], other)
    for parse in (evaluate.parse_args, explainability.parse_args):
        cfg, _ = parse(["--adapter", adapter, "--output_dir", str(tmp_path / "o")])
        # not given: the adapter's own base model and data set
        assert cfg.model_name_or_path == trained_on
        assert cfg.dataset == os.path.abspath(demo_assets[1])
        cfg, _ = parse(["--adapter", adapter, "--output_dir", str(tmp_path / "o"), "--model_name_or_path", other,
                        "--dataset", other_data])
        assert (cfg.model_name_or_path, cfg.dataset) == (other, other_data)  # given: those, in both scripts


# ---------------------------------------------------------------------------
# Data: leakage, labels, annotation files, sources


def test_validation_split_is_rebuilt_from_the_adapters_run_settings(tiny_adapter, demo_assets):
    adapter = tiny_adapter[0]
    cfg = PetConfig(dataset=demo_assets[1])  # evaluate's defaults: val_fraction 0.1, seed 42
    fraction, seed = adapter_split_settings(adapter, cfg, "validation", 42)
    assert (fraction, seed) == (0.2, TRAIN_SEED)
    trained = load_splits(demo_assets[1], 0.2, TRAIN_SEED)
    rebuilt = load_splits(demo_assets[1], fraction, seed)
    assert [r.image_id for r in rebuilt["validation"]] == [r.image_id for r in trained["validation"]]
    assert not {r.image_id for r in rebuilt["validation"]} & {r.image_id for r in trained["train"]}


def test_validation_split_needs_the_adapters_run_config(tiny_adapter, tmp_path):
    copy = str(tmp_path / "a")
    shutil.copytree(tiny_adapter[0], copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    os.remove(os.path.join(copy, "run_config.json"))
    with pytest.raises(UserError, match="needs the adapter's run_config.json"):
        adapter_split_settings(copy, PetConfig(), "validation", 42)
    assert adapter_split_settings(copy, PetConfig(), "test", 42) == (0.1, 42)


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


def _hf_pets(tmp_path, labels, images=None):
    """A save_to_disk DatasetDict with a ClassLabel column (train and test)."""
    import datasets

    png = str(tmp_path / "x.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["abyssinian", "beagle"])})
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


def test_decompression_bomb_warning_in_open_is_a_bad_image(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns, inside Image.open (89-179 Mpx by default)
    path = str(tmp_path / "big.png")
    Image.new("L", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="DecompressionBomb"):
        load_image(Record("big", 0, path))


def test_corrupt_and_wrong_size_trimaps_are_warned(tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((4, 4), 1, np.uint8)).save(small)
    with caplog.at_level(logging.WARNING):
        assert explainability.load_pet_mask(str(broken), (8, 8)) is None
        assert explainability.load_pet_mask(str(small), (8, 8)).shape == (8, 8)
    assert "unreadable trimap" in caplog.text and "is 4x4, its image 8x8" in caplog.text


# ---------------------------------------------------------------------------
# Embedding cache


@pytest.fixture(scope="module")
def encoder(demo_assets):
    model = load_base_model(demo_assets[0]).eval()
    processor = load_processor(demo_assets[0])
    return model, processor


def _cache(folder, encoder):
    model, processor = encoder
    return EmbeddingCache(str(folder), vision_fingerprint(model, processor), "float32")


def _build(cache, encoder, records):
    model, processor = encoder
    return cache.build(records, lambda px: image_embeddings(model, px), processor.image_processor, batch_size=3)


def _assert_cached_correctly(cache, encoder, records):
    model, processor = encoder
    for r in records:
        [key] = cache.keys([r])
        pixels = processor.image_processor(load_image(r), return_tensors="pt")["pixel_values"]
        assert torch.allclose(cache.get(key), image_embeddings(model, pixels)[0], atol=1e-5), r.image_id


def test_two_builders_sharing_the_cache_do_not_mix_rows(demo_assets, encoder, tmp_path):
    records = load_splits(demo_assets[1])["validation"][:10]
    a, b = _cache(tmp_path, encoder), _cache(tmp_path, encoder)  # both opened before either built
    assert _build(a, encoder, records[:5]) == 5
    assert _build(b, encoder, records[5:]) == 5  # b's index is stale: it must not reuse a's chunk name or drop a's rows
    fresh = _cache(tmp_path, encoder)
    assert len(fresh.index) == 10
    _assert_cached_correctly(fresh, encoder, records)
    assert _build(fresh, encoder, records) == 0


def test_cache_is_keyed_by_content_not_size_and_mtime(pets, encoder, tmp_path):
    records = load_splits(pets, 0.0)["train"][:2]
    path = records[0].source
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path, format="BMP")  # BMP: the byte size depends only on the shape
    cache = _cache(tmp_path / "c", encoder)
    assert _build(cache, encoder, records) == 2
    stat = os.stat(path)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(path, format="BMP")  # another picture, same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same mtime
    assert os.path.getsize(path) == stat.st_size
    cache = _cache(tmp_path / "c", encoder)
    assert _build(cache, encoder, records) == 1
    _assert_cached_correctly(cache, encoder, records)


@pytest.mark.parametrize("damage", ["index", "chunk"])
def test_corrupt_cache_is_rebuilt_with_a_warning(pets, encoder, tmp_path, damage, caplog):
    records = load_splits(pets, 0.0)["train"][:4]
    cache = _cache(tmp_path, encoder)
    _build(cache, encoder, records)
    if damage == "index":
        open(cache.index_path, "w").write('{"broken": ')
    else:
        [chunk] = [n for n in os.listdir(cache.dir) if n.startswith("chunk-")]
        path = os.path.join(cache.dir, chunk)
        os.truncate(path, os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING):
        cache = _cache(tmp_path, encoder)
        assert _build(cache, encoder, records) == 4
    assert "corrupt" in caplog.text
    _assert_cached_correctly(_cache(tmp_path, encoder), encoder, records)


def test_image_deleted_after_listing_is_a_counted_bad_image(pets, encoder, tmp_path):
    records = load_splits(pets, 0.0)["train"][:3]
    os.remove(records[1].source)
    cache = _cache(tmp_path, encoder)
    assert _build(cache, encoder, records) == 2
    dataset = CachedEmbeddingDataset(records, cache, PetConfig().caption_template)
    assert len(dataset) == 2 and list(dataset.bad_images) == [records[1].image_id]


# ---------------------------------------------------------------------------
# Training runs


@pytest.mark.parametrize("change", [["--lora_r", "4"], ["--learning_rate", "0.5"]])
def test_resume_refuses_a_checkpoint_of_other_settings(tiny_adapter, change):
    _, argv = tiny_adapter
    with pytest.raises(UserError, match="belongs to a run with other settings"):
        train.main(argv + change + ["--resume_from_checkpoint", "True"])


def test_resume_accepts_its_own_checkpoint_and_refuses_one_without_settings(tiny_adapter, tmp_path):
    out, argv = tiny_adapter
    cfg, args = train.parse_args(argv + ["--resume_from_checkpoint", "True"])
    assert trainer.resume_point(cfg, args) == os.path.join(out, "checkpoint-2")
    old = str(tmp_path / "old")
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(old, "checkpoint-2"))
    os.remove(os.path.join(old, "checkpoint-2", trainer.RUN_SETTINGS_FILE))
    cfg, args = train.parse_args([*argv[:-4], "--output_dir", old, "--resume_from_checkpoint", "True"])
    with pytest.raises(UserError, match="cannot be checked against this run"):
        trainer.resume_point(cfg, args)


def _corrupt_images(names, images_dir):
    for name in names:
        open(os.path.join(images_dir, f"{name}.jpg"), "wb").write(b"not a jpeg")


@pytest.mark.parametrize("cached", ["True", "False"])
def test_all_validation_images_unreadable_is_an_error(demo_assets, tmp_path, cached):
    data = write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=6, test_per_breed=1, size=32)
    _corrupt_images([r.image_id for r in load_splits(data, 0.34, 0)["validation"]], os.path.join(data, "images"))
    # cached: found before training; uncached: the first validation batch is empty. Never "best accuracy 0.000"
    with pytest.raises(UserError, match="no validation image could be read|a whole batch of images was unreadable"):
        train.main(["--demo", "--model_name_or_path", demo_assets[0], "--dataset", data, "--val_fraction", "0.34",
                    "--seed", "0", "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--use_embedding_cache", cached,
                    "--embedding_cache_dir", str(tmp_path / "cache")])
    assert not os.path.exists(tmp_path / "o" / "adapter_model.safetensors")


def test_all_trainval_unreadable_with_the_cache_is_one_line(demo_assets, tmp_path):
    data = write_synthetic_pets(str(tmp_path / "pets"), breeds=[0, 1], trainval_per_breed=3, test_per_breed=1, size=32)
    _corrupt_images([r.image_id for s in ("train", "validation") for r in load_splits(data)[s]], os.path.join(data, "images"))
    with pytest.raises(UserError, match="no training image could be read"):
        train.main(["--demo", "--model_name_or_path", demo_assets[0], "--dataset", data, "--output_dir",
                    str(tmp_path / "o"), "--max_steps", "1", "--embedding_cache_dir", str(tmp_path / "cache")])


def test_base_model_without_decoder_weights_is_refused(demo_assets, tmp_path):
    from safetensors.torch import load_file, save_file

    base = str(tmp_path / "base")
    shutil.copytree(demo_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("text_decoder.")}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks .* weights .* incomplete"):
        load_base_model(base)


def test_truncated_base_weights_and_garbled_tokenizer_are_one_line(demo_assets, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(demo_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_base_model(base)
    open(os.path.join(base, "tokenizer.json"), "w").write('{"version": "1.0", "model": {"type": "Nonsense"')
    with pytest.raises(UserError, match="processor files .* are corrupt"):
        load_processor(base)


# ---------------------------------------------------------------------------
# Broken adapters: one clear error, never a zero-shot model reported as fine-tuned


def _adapter_copy(tiny_adapter, tmp_path):
    path = str(tmp_path / "adapter")
    shutil.copytree(tiny_adapter[0], path, ignore=shutil.ignore_patterns("checkpoint-*"))
    return path


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "adapter_model.safetensors")
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


@pytest.mark.parametrize("case,message", [
    ("nan", "NaN or infinite weights"),
    ("inf", "NaN or infinite weights"),
    ("renamed", "match no LoRA module"),
    ("targets", "does not fit its own adapter_config.json"),
    ("garbled_tokenizer", "processor files .* are corrupt"),
])
def test_broken_adapter_is_refused(tiny_adapter, tmp_path, case, message):
    path = _adapter_copy(tiny_adapter, tmp_path)
    if case in ("nan", "inf"):
        bad = float("nan") if case == "nan" else float("inf")
        _rewrite_weights(path, lambda sd: {k: (v.fill_(bad) if i == 0 else v) for i, (k, v) in enumerate(sd.items())})
    elif case == "renamed":
        _rewrite_weights(path, lambda sd: {k.replace(".query.", ".querx."): v for k, v in sd.items()})
    elif case == "targets":
        cfg_path = os.path.join(path, "adapter_config.json")
        cfg = json.load(open(cfg_path))
        json.dump({**cfg, "target_modules": ["query"]}, open(cfg_path, "w"))
    elif case == "garbled_tokenizer":
        open(os.path.join(path, "tokenizer.json"), "w").write("{ this is not json")
    with pytest.raises(UserError, match=message):
        load_lora_for_inference(path)


def test_intact_adapter_still_loads(tiny_adapter):
    model, _ = load_lora_for_inference(tiny_adapter[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------
# Output folders: one writer, nothing half-written, one line for disk faults


def test_second_writer_into_an_output_folder_is_refused(tmp_path, demo_assets, tiny_adapter):
    out = str(tmp_path / "out")
    with locked_output_dir(out):
        with pytest.raises(UserError, match="another run is writing"):
            with locked_output_dir(out):
                pass
        with pytest.raises(UserError, match="another run is writing"):
            train.main(["--demo", "--model_name_or_path", demo_assets[0], "--dataset", demo_assets[1],
                        "--output_dir", out, "--max_steps", "1"])
        with pytest.raises(UserError, match="another run is writing"):
            evaluate.main(["--adapter", tiny_adapter[0], "--dataset", demo_assets[1], "--output_dir", out])
        with pytest.raises(UserError, match="another run is writing"):
            explainability.main(["--adapter", tiny_adapter[0], "--dataset", demo_assets[1], "--output_dir", out])
    with locked_output_dir(out):  # released when the run ends
        pass


def test_failed_write_keeps_the_old_outputs_and_leftovers_are_cleaned(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, "metrics.json"), "w").write("old")
    with pytest.raises(OSError):
        with staged_outputs(out) as tmp:
            open(os.path.join(tmp, "metrics.json"), "w").write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert open(os.path.join(out, "metrics.json")).read() == "old"
    assert not [n for n in os.listdir(out) if n.startswith(".saving-")]
    os.makedirs(os.path.join(out, ".saving-killed"))  # what a killed save leaves
    with locked_output_dir(out):
        assert not os.path.exists(os.path.join(out, ".saving-killed"))
    with staged_outputs(out) as tmp:
        open(os.path.join(tmp, "metrics.json"), "w").write("new")
    assert open(os.path.join(out, "metrics.json")).read() == "new"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_disk_faults_are_one_line(code, capsys):
    def main():
        raise OSError(code, os.strerror(code), "/data/out/metrics.json")

    with pytest.raises(SystemExit) as exit_info:
        run_io.run_main(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "/data/out/metrics.json" in err[0]


def test_other_os_errors_still_raise():
    def main():
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(FileNotFoundError):
        run_io.run_main(main)


class _RunsCode:
    """A pickle payload that creates a file when unpickled: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_pytorch_model_bin_is_refused_without_running_code(tmp_path):
    """The Hub's base checkpoint is pytorch_model.bin: it must load with weights_only=True (torch >= 2.6)."""
    from demo import build_tiny_blip

    folder = build_tiny_blip(str(tmp_path / "base"), hidden=32)
    for name in os.listdir(folder):
        if name.startswith("model") and name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    marker = tmp_path / "code-ran"
    torch.save({"text_decoder.cls.predictions.bias": _RunsCode(str(marker))}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(UserError, match="cannot load the model"):
        load_base_model(folder)
    assert not marker.exists()
    requirement = next(line for line in open(os.path.join(run_io.__file__.rsplit(os.sep, 1)[0], "requirements.txt"))
                       if line.startswith("torch"))
    assert requirement.split("#")[0].strip() == "torch>=2.6"
