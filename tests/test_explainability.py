"""explainability.py and attention.py: cross-attention maps against a recomputation, pet masks, the demo explanation."""

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import explainability
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
from helpers import run_script
from inference import image_embeddings
from labels import OXFORD_PETS
from model import load_base_model, load_processor
from run_io import UserError


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    model_dir, data_dir = tiny_assets
    model, processor = load_base_model(model_dir).eval(), load_processor(model_dir)
    images = [load_image(r) for r in load_splits(data_dir)["test"][:2]]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    # Two captions of different lengths, so the batch has padding, starting from bos as generate does
    enc = processor.tokenizer(
        ["a photo of an abyssinian, a type of pet.", "a photo of a pug."], padding="longest", return_tensors="pt"
    )
    enc["input_ids"][:, 0] = processor.tokenizer.bos_token_id
    return model, processor, pixels, enc["input_ids"], enc["attention_mask"]


def _hooked_inputs(model):
    """Forward hooks on every decoder layer's cross-attention module, keeping its inputs; returns (store, handles)."""
    store, handles = [], []
    for layer in model.text_decoder.bert.encoder.layer:

        def keep(module, args, kwargs, out):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            store.append((module, hidden.detach(), kwargs["encoder_hidden_states"].detach()))

        handles.append(layer.crossattention.self.register_forward_hook(keep, with_kwargs=True))
    return store, handles


def _attention_probs(module, hidden, encoder_hidden):
    """softmax(QK^T / sqrt(d)) per head from the module's own query and key projections: (B, heads, T, 1 + patches)."""
    heads, size = module.num_attention_heads, module.attention_head_size
    q = module.query(hidden).view(*hidden.shape[:2], heads, size).transpose(1, 2)
    k = module.key(encoder_hidden).view(*encoder_hidden.shape[:2], heads, size).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / size**0.5, dim=-1)


@pytest.mark.parametrize("layers", [None, [-1], [0, 1]])
def test_maps_equal_attention_recomputed_from_each_layers_inputs_and_are_distributions(tiny, layers):
    model, _, pixels, ids, mask = tiny
    store, handles = _hooked_inputs(model)
    try:
        maps = cross_attention_maps(model, pixels, ids, mask, layers)
    finally:
        for h in handles:
            h.remove()
    n_layers = model.config.text_config.num_hidden_layers
    assert len(store) == n_layers  # one pass, each layer's cross-attention ran once
    chosen = range(n_layers) if layers is None else layers
    # recomputed from each layer's inputs and weights, not read from the attentions the model returns
    with torch.no_grad():
        probs = torch.stack([_attention_probs(*store[i]) for i in chosen]).mean(dim=(0, 2))[
            ..., 1:
        ]  # layers, heads; drop CLS
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
    torch.testing.assert_close(
        cross_attention_maps(model, embeds, ids, mask), cross_attention_maps(model, pixels, ids, mask)
    )


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


def test_breed_word_pieces_are_gathered_into_one_map(tiny_assets):
    processor = load_processor(tiny_assets[0])
    tok = processor.tokenizer
    ids = tok("a photo of an abyssinian, a type of pet.")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    pieces = [i for i, t in enumerate(tokens) if t in ("abyss", "##inian")]
    assert len(pieces) == 2  # the real tokenizer splits the breed name
    words = word_spans(tokens, set(tok.all_special_tokens))
    assert [w for w, _, _ in words] == ["a", "photo", "of", "an", "abyssinian", ",", "a", "type", "of", "pet", "."]
    s, e, kind = subject_span(words, OXFORD_PETS)
    assert kind == "breed" and words[s:e] == [("abyssinian", pieces[0], pieces[-1] + 1)]
    # One map for the breed: the steps that write its two pieces (rows before each piece), averaged
    maps = np.random.default_rng(0).dirichlet(np.ones(16), size=len(tokens)).reshape(len(tokens), 4, 4)
    breed = span_map(maps, words[s][1], words[e - 1][2])
    np.testing.assert_allclose(breed, maps[[p - 1 for p in pieces]].mean(axis=0))
    assert breed.sum() == pytest.approx(1.0)


def test_multi_word_breed_and_fallback_to_the_animal_word(tiny_assets):
    tok = load_processor(tiny_assets[0]).tokenizer
    special = set(tok.all_special_tokens)

    def subject(text):
        words = word_spans(tok.convert_ids_to_tokens(tok(text)["input_ids"]), special)
        found = subject_span(words, OXFORD_PETS)
        return (" ".join(w for w, _, _ in words[found[0] : found[1]]), found[2]) if found else None

    # The whole name, not the alias "pit bull" inside it
    assert subject("a photo of an american pit bull terrier, a type of pet.") == ("american pit bull terrier", "breed")
    assert subject("a photo of a cat.") == ("cat", "animal")
    assert subject("a photo of a type.") is None


@pytest.mark.slow
def test_explain_demo_subprocess_writes_figures_metrics_and_index(demo_run, tmp_path):
    cwd, _ = demo_run
    user = tmp_path / "my pet.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(user)
    missing = tmp_path / "missing.jpg"
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    proc = run_script(
        [
            "explainability.py",
            "--demo",
            "--image",
            str(user),
            "--image",
            str(missing),
            "--image",
            str(not_image),
            "--num_images",
            "2",
        ],
        cwd=cwd,
    )
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
    assert run_config["explain"]["image"] == [str(user), str(missing), str(not_image)]


@pytest.mark.slow
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


def test_corrupt_and_wrong_size_trimaps_are_warned(tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((4, 4), 1, np.uint8)).save(small)
    with caplog.at_level(logging.WARNING):
        assert explainability.load_pet_mask(str(broken), (8, 8)) is None
        assert explainability.load_pet_mask(str(small), (8, 8)).shape == (8, 8)
    assert "unreadable trimap" in caplog.text and "is 4x4, its image 8x8" in caplog.text


def test_explain_rerun_with_fewer_images_leaves_only_its_own_figures(tiny_adapter, tiny_assets, tmp_path):
    out = str(tmp_path / "explain")
    argv = ["--adapter", tiny_adapter[0], "--dataset", tiny_assets[1], "--output_dir", out]
    explainability.main(argv + ["--num_images", "3"])
    assert len([n for n in os.listdir(out) if n[:3].isdigit()]) == 3
    result = explainability.main(argv + ["--num_images", "1"])
    figures = sorted(n for n in os.listdir(out) if n.endswith(".png") and n != "attention_metrics.png")
    assert figures == [image["figure"] for image in result["metrics"]["images"]] and len(figures) == 1
