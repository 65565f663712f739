import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

from attention import (
    cross_attention_maps,
    load_pet_mask,
    overlay,
    patch_grid,
    pet_share,
    pointing_hit,
    span_map,
    subject_span,
    word_spans,
)
from config import DEMO_DIR
from data import load_image, load_splits
from explainability import parse_layers
from inference import image_embeddings
from model import load_base_model, load_processor
from run_io import UserError


@pytest.fixture(scope="module")
def tiny(demo_assets):
    model_dir, data_dir = demo_assets
    model, processor = load_base_model(model_dir).eval(), load_processor(model_dir)
    images = [load_image(r) for r in load_splits(data_dir)["test"][:2]]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    # Two captions of different lengths, so the batch has padding, starting from bos as generate does
    enc = processor.tokenizer(["a photo of an abyssinian, a type of pet.", "a photo of a pug."],
                              padding="longest", return_tensors="pt")
    enc["input_ids"][:, 0] = processor.tokenizer.bos_token_id
    return model, processor, pixels, enc["input_ids"], enc["attention_mask"]


def _hooked_probs(model):
    """Forward hooks on every decoder layer's cross-attention module; returns (store, handles)."""
    store, handles = [], []
    for layer in model.text_decoder.bert.encoder.layer:
        handles.append(layer.crossattention.self.register_forward_hook(lambda mod, args, out: store.append(out[1].detach())))
    return store, handles


@pytest.mark.parametrize("layers", [None, [-1], [0, 1]])
def test_maps_equal_a_forward_hook_on_cross_attention_and_are_distributions(tiny, layers):
    model, _, pixels, ids, mask = tiny
    store, handles = _hooked_probs(model)
    try:
        maps = cross_attention_maps(model, pixels, ids, mask, layers)
    finally:
        for h in handles:
            h.remove()
    n_layers = model.config.text_config.num_hidden_layers
    assert len(store) == n_layers  # one pass, each layer's cross-attention ran once
    chosen = range(n_layers) if layers is None else layers
    probs = torch.stack([store[i] for i in chosen]).mean(dim=(0, 2))[..., 1:]  # layers, heads; drop CLS
    rows, cols = patch_grid(model)
    assert rows * cols == image_embeddings(model, pixels).shape[1] - 1  # the encoder's patch tokens, CLS aside
    expected = (probs / probs.sum(-1, keepdim=True)).reshape(*ids.shape, rows, cols)
    assert maps.shape == (*ids.shape, rows, cols)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(ids.shape))
    assert not torch.allclose(maps[0, 1], maps[1, 1])  # two images, two different maps


def test_maps_from_embeddings_equal_maps_from_pixels(tiny):
    model, _, pixels, ids, mask = tiny
    embeds = image_embeddings(model, pixels)
    torch.testing.assert_close(cross_attention_maps(model, embeds, ids, mask), cross_attention_maps(model, pixels, ids, mask))


def test_layer_choice_is_checked(tiny):
    model, _, pixels, ids, mask = tiny
    with pytest.raises(UserError, match="out of range"):
        cross_attention_maps(model, pixels, ids, mask, layers=[5])
    assert parse_layers("all") is None and parse_layers("-1") == [-1] and parse_layers("8, 9") == [8, 9]
    with pytest.raises(UserError):
        parse_layers("last")


def test_overlay_has_the_image_size():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    grid_map = np.zeros((4, 4), np.float32)
    grid_map[0, 0] = 1.0
    out = overlay(image, grid_map)
    assert out.shape == image.shape and out.dtype == np.uint8
    # JET: the peak patch is red, the far corner blue
    assert out[2, 2, 0] > out[2, 2, 2] and out[-2, -2, 2] > out[-2, -2, 0]
    assert overlay(image, np.full((4, 4), 1 / 16)).shape == image.shape  # a flat map does not divide by zero


def test_pet_share_and_pointing_game_on_hand_made_maps():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # the pet is the left half
    grid_map = np.array([[0.5, 0.1], [0.3, 0.1]])
    share, area = pet_share(grid_map, mask)
    assert share == pytest.approx(0.8) and area == pytest.approx(0.5)
    assert pointing_hit(grid_map, mask)
    assert not pointing_hit(np.array([[0.1, 0.5], [0.3, 0.1]]), mask)
    # A patch half on the pet counts half; a flat map scores exactly the pet's area
    quarter = np.zeros((8, 8), bool)
    quarter[:, :2] = True
    assert pet_share(np.full((2, 2), 0.25), quarter) == pytest.approx((0.25, 0.25))
    assert pet_share(np.array([[1.0, 0.0], [0.0, 0.0]]), quarter)[0] == pytest.approx(0.5)
    # Image size not a multiple of the grid: the peak patch's centre decides
    odd = np.zeros((9, 7), bool)
    odd[6:, 4:] = True
    assert pointing_hit(np.array([[0.0, 0.0], [0.0, 1.0]]), odd)


def test_trimap_pet_mask_is_pet_plus_border(tmp_path):
    trimap = np.array([[1, 2], [3, 2]], np.uint8)
    Image.fromarray(trimap).save(tmp_path / "t.png")
    assert load_pet_mask(str(tmp_path / "t.png"), (2, 2)).tolist() == [[True, False], [True, False]]
    assert load_pet_mask(str(tmp_path / "t.png"), (4, 4)).shape == (4, 4)  # resized to the image (W, H)


def test_breed_word_pieces_are_gathered_into_one_map(demo_assets):
    processor = load_processor(demo_assets[0])
    tok = processor.tokenizer
    ids = tok("a photo of an abyssinian, a type of pet.")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    pieces = [i for i, t in enumerate(tokens) if t in ("abyss", "##inian")]
    assert len(pieces) == 2  # the real tokenizer splits the breed name
    words = word_spans(tokens, set(tok.all_special_tokens))
    assert [w for w, _, _ in words] == ["a", "photo", "of", "an", "abyssinian", ",", "a", "type", "of", "pet", "."]
    s, e, kind = subject_span(words)
    assert kind == "breed" and words[s:e] == [("abyssinian", pieces[0], pieces[-1] + 1)]
    # One map for the breed: the steps that write its two pieces (rows before each piece), averaged
    maps = np.random.default_rng(0).dirichlet(np.ones(16), size=len(tokens)).reshape(len(tokens), 4, 4)
    breed = span_map(maps, words[s][1], words[e - 1][2])
    np.testing.assert_allclose(breed, maps[[p - 1 for p in pieces]].mean(axis=0))
    assert breed.sum() == pytest.approx(1.0)


def test_multi_word_breed_and_fallback_to_the_animal_word(demo_assets):
    tok = load_processor(demo_assets[0]).tokenizer
    special = set(tok.all_special_tokens)

    def subject(text):
        words = word_spans(tok.convert_ids_to_tokens(tok(text)["input_ids"]), special)
        found = subject_span(words)
        return (" ".join(w for w, _, _ in words[found[0]:found[1]]), found[2]) if found else None

    # The whole name, not the alias "pit bull" inside it
    assert subject("a photo of an american pit bull terrier, a type of pet.") == ("american pit bull terrier", "breed")
    assert subject("a photo of a cat.") == ("cat", "animal")
    assert subject("a photo of a type.") is None


def test_explain_demo_subprocess_writes_figures_metrics_and_index(demo_run, tmp_path):
    cwd, _ = demo_run
    user = tmp_path / "my pet.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(user)
    missing = tmp_path / "missing.jpg"
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    proc = run_script(["explainability.py", "--demo", "--image", str(user), "--image", str(missing),
                       "--image", str(not_image), "--num_images", "2"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "skipping --image" in line]
    assert len(warnings) == 2 and "no such file" in warnings[0] and "notes.jpg" in warnings[1]

    out = os.path.join(cwd, DEMO_DIR, "explain")
    figures = sorted(f for f in os.listdir(out) if re.match(r"\d{3}_.*\.png$", f))
    assert len(figures) == 3 and figures[-1] == "003_my_pet.png"
    assert Image.open(os.path.join(out, figures[0])).size[0] > 600
    index = open(os.path.join(out, "index.md")).read()
    assert all(f"]({f})" in index for f in figures + ["attention_metrics.png"])
    metrics = json.load(open(os.path.join(out, "attention_metrics.json")))
    for name in ("zero_shot", "fine_tuned"):  # evaluate.py's keys
        s = metrics["summary"][name]
        assert s["images_with_trimap"] == 2  # the user's image has no trimap
        # an image is scored when its caption names a subject; the untrained zero-shot base may name none
        named = sum(n for kind, n in s["subject_kinds"].items() if kind != "none")
        assert s["images_scored"] == named and (s["mean_mask_share"] is None) == (named == 0)
        for key in ("mean_mask_share", "mean_pet_attention_share", "pointing_game_hit_rate"):
            assert s[key] is None or 0 <= s[key] <= 1, (name, key, s[key])
    assert metrics["summary"]["fine_tuned"]["images_scored"] == 2  # so the ranges above were checked
    assert metrics["summary"]["fine_tuned"]["subject_kinds"] == {"breed": 2}  # the demo adapter names breeds
    assert metrics["summary"]["zero_shot"]["subject_kinds"] == {"animal": 2}  # the pre-trained base: cat or dog
    assert "fine_tuned" in metrics["images"][2] and metrics["images"][2]["has_trimap"] is False
    run_config = json.load(open(os.path.join(out, "run_config.json")))
    assert run_config["ExplainConfig"]["image"] == [str(user), str(missing), str(not_image)]


def test_adapter_problem_is_one_clear_line(demo_run, tmp_path):
    cwd, _ = demo_run
    proc = run_script(["explainability.py", "--demo", "--adapter", str(tmp_path / "nope")], cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: adapter folder")
    assert "Traceback" not in proc.stderr


def test_unknown_flag_is_one_clear_error():
    import explainability

    with pytest.raises(UserError, match="no_such_flag"):
        explainability.parse_args(["--no_such_flag", "1"])
    with pytest.raises(UserError, match="--split: invalid choice"):
        explainability.parse_args(["--split", "dev"])
