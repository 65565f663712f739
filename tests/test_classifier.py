"""The LoRA classifier baseline: its predictions against an independent computation, epoch choice, seeding, the
cache, unreadable images, label sets of any size, the parameter budget and other backbones."""

import copy
import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import classifier
from classifier import (
    BACKBONE_DEFAULT,
    BlipVisionClassifier,
    ClassifierSettings,
    add_lora,
    blip_backbone,
    load_backbone,
    predict,
    run_classifier,
    save_classifier,
    train_classifier,
    trainable_parameters,
    trained_weights,
)
from data import load_image, load_splits
from demo import REAL_PROCESSOR_DIR
from model import create_lora_model, has_vision_lora, load_base_model, load_processor
from run_io import UserError

FAST = ClassifierSettings(lora_r=8, lora_alpha=16, epochs=2, batch_size=8, learning_rate=1e-2, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    """(random tiny BLIP, its processor, small splits): 24 training, 8 validation and 8 test images of 8 classes."""
    model_dir, data_dir = tiny_assets
    splits = load_splits(data_dir)
    small = {"train": splits["train"][::9], "validation": splits["validation"][::3], "test": splits["test"][::10]}
    return load_base_model(model_dir).eval(), load_processor(model_dir), small


@pytest.fixture
def backbone(tiny):
    model, processor, _ = tiny
    return blip_backbone(model, processor, num_classes=8)


def _pixels(processor, record) -> torch.Tensor:
    return processor.image_processor(load_image(record), return_tensors="pt")["pixel_values"]


def _merged_by_hand(model, weights: dict, scale: float):
    """A copy of the caller's vision encoder with W + scale * B @ A in every LoRA'd qkv, and the head's (W, b)."""
    vision = copy.deepcopy(model.vision_model).eval()
    modules = dict(vision.named_modules())
    prefix, suffix = "base_model.model.vision_model.", ".lora_A.default.weight"
    merged = 0
    for name, a in weights.items():
        if name.endswith(suffix):
            b = weights[name.replace("lora_A", "lora_B")]
            modules[name[len(prefix) : -len(suffix)]].weight.data += scale * b @ a
            merged += 1
    assert merged == model.config.vision_config.num_hidden_layers  # one qkv per layer
    head = "base_model.model.classifier.modules_to_save.default."
    return vision, weights[head + "weight"].numpy(), weights[head + "bias"].numpy()


def test_predictions_equal_the_head_on_the_merged_encoder_by_hand(tiny, backbone, tmp_path):
    """Logits = head(pooler_output) of the encoder with its LoRA merged, all recomputed from the saved weights."""
    model, processor, splits = tiny
    result = run_classifier(backbone, splits["train"], splits["validation"], splits["test"], FAST, cache_dir=tmp_path)
    weights = load_file(str(tmp_path / f"classifier-{result.key}.safetensors"))
    vision, w, b = _merged_by_hand(model, weights, FAST.lora_alpha / FAST.lora_r)

    def logits(records, half=False):
        with torch.no_grad():
            px = torch.cat([_pixels(processor, r) for r in records])
            px = px.half().float() if half else px  # training keeps pixels in float16 (classifier.pixel_tensor)
            return vision(pixel_values=px).pooler_output.numpy() @ w.T + b

    expected = logits(splits["test"])
    np.testing.assert_allclose(result.logits, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.pred, expected.argmax(1))
    assert result.logits.shape == (len(splits["test"]), 8)
    # the kept weights are the best epoch's: their validation accuracy is the one recorded for that epoch
    labels = np.array([r.label for r in splits["validation"]])
    kept = float((logits(splits["validation"], half=True).argmax(1) == labels).mean())
    assert kept == pytest.approx(max(result.validation_accuracy)) == result.validation_accuracy[result.best_epoch - 1]
    assert result.train_images == 24 and result.validation_images == 8 and not result.cached
    assert result.train_seconds > 0 and result.images_per_second > 0
    assert json.loads(json.dumps(result.summary()))["best_epoch"] == result.best_epoch  # JSON-ready


def test_the_best_validation_epoch_is_kept_ties_to_the_earlier(tiny, backbone, monkeypatch):
    model, processor, splits = tiny
    scripted, snapshots = iter([0.25, 0.5, 0.5, 0.125]), []

    def accuracy(net, *args):
        snapshots.append(trained_weights(net))
        return next(scripted)

    monkeypatch.setattr(classifier, "accuracy", accuracy)
    trained = train_classifier(backbone, splits["train"], splits["validation"], dataclasses.replace(FAST, epochs=4))
    assert trained.best_epoch == 2 and trained.validation_accuracy == [0.25, 0.5, 0.5, 0.125]
    kept = trained_weights(trained.net)
    assert all(torch.equal(kept[n], snapshots[1][n]) for n in kept)
    for later in snapshots[2:]:  # training went on after epoch 2: those weights differ
        assert not all(torch.equal(kept[n], later[n]) for n in kept)


def test_training_is_seeded_and_leaves_the_caller_alone(tiny):
    model, processor, splits = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    attention = type(model.vision_model.encoder.layers[0].self_attn)
    rng = torch.get_rng_state()
    backbone = blip_backbone(model, processor, 8)

    def weights(seed):
        return trained_weights(
            train_classifier(backbone, splits["train"], [], dataclasses.replace(FAST, epochs=1, seed=seed)).net
        )

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is as it was
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not has_vision_lora(model) and grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert type(model.vision_model.encoder.layers[0].self_attn) is attention


def test_unreadable_images_are_counted_and_left_out(tiny, backbone, tmp_path):
    model, processor, splits = tiny
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    train = [dataclasses.replace(r) for r in splits["train"]]
    test = [dataclasses.replace(r) for r in splits["test"]]
    train[0].source = train[1].source = str(broken)
    test[2].source = str(broken)
    result = run_classifier(backbone, train, splits["validation"], test, FAST)
    assert result.train_images == len(train) - 2
    assert set(result.bad_images) == {train[0].image_id, train[1].image_id, test[2].image_id}
    assert result.pred[2] == -1 and np.isnan(result.logits[2]).all()
    readable = [i for i in range(len(test)) if i != 2]
    assert (result.pred[readable] >= 0).all() and np.isfinite(result.logits[readable]).all()


def test_the_cache_is_used_for_the_same_classifier_only(tiny, backbone, tmp_path, monkeypatch, caplog):
    model, processor, splits = tiny
    steps = []
    step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)

    once = dataclasses.replace(FAST, epochs=1)

    def run(train=splits["train"], settings=once, **kwargs):
        steps.clear()
        result = run_classifier(
            backbone, train, splits["validation"], splits["test"], settings, cache_dir=tmp_path, **kwargs
        )
        return result, len(steps)

    first, trained_steps = run()
    assert trained_steps == 3  # 24 images, batches of 8, one epoch
    again, n = run()
    assert n == 0 and again.cached and again.key == first.key
    np.testing.assert_array_equal(again.logits, first.logits)
    assert (again.best_epoch, again.validation_accuracy) == (first.best_epoch, first.validation_accuracy)
    assert run(settings=dataclasses.replace(once, seed=4))[1] > 0  # another seed
    assert run(train=splits["train"][1:])[1] > 0  # another training split
    relabelled = [dataclasses.replace(r) for r in splits["train"]]
    relabelled[0].label = (relabelled[0].label + 1) % 8
    assert run(train=relabelled)[1] > 0  # another label on one image
    assert run(retrain=True)[1] > 0  # asked to
    assert run()[1] == 0
    (tmp_path / f"classifier-{first.key}.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="classifier"):
        result, n = run()
    assert n > 0 and not result.cached and "unusable" in caplog.text
    np.testing.assert_array_equal(result.logits, first.logits)  # trained again, the same seeded result
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


def test_any_number_of_classes(tiny):
    model, processor, splits = tiny

    def relabel(records, num):
        return [dataclasses.replace(r, label=r.label % num) for r in records]

    backbone = blip_backbone(model, processor, num_classes=3)
    result = run_classifier(
        backbone, relabel(splits["train"], 3), relabel(splits["validation"], 3), relabel(splits["test"], 3), FAST
    )
    assert result.logits.shape == (len(splits["test"]), 3) and set(result.pred) <= {0, 1, 2}
    hidden = model.config.vision_config.hidden_size
    assert result.trainable_parameters["head"] == hidden * 3 + 3
    with pytest.raises(ValueError, match="outside the 3 classes"):
        train_classifier(backbone, splits["train"], [], FAST)  # labels up to 7
    with pytest.raises(ValueError, match="needs two"):
        train_classifier(backbone, [dataclasses.replace(r, label=0) for r in splits["train"]], [], FAST)


def test_the_lora_budget_is_the_captioners(tiny):
    """Base-sized shapes (the real config.json, on the meta device): r=64 on qkv has as many parameters as the
    captioner's r=32 on the decoder's query,value; the tiny model's count follows the same formula."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    config = BlipConfig.from_pretrained(REAL_PROCESSOR_DIR)
    with torch.device("meta"):
        blip = BlipForConditionalGeneration(config)
        captioner = create_lora_model(copy.deepcopy(blip))  # the captioner's defaults: r=32, query,value
        counts = trainable_parameters(
            add_lora(BlipVisionClassifier(blip.vision_model, 37), ("qkv",), ClassifierSettings())
        )
    captioner_lora = sum(p.numel() for n, p in captioner.named_parameters() if p.requires_grad)
    assert counts["lora"] == captioner_lora == 12 * 64 * (768 + 3 * 768) == 2_359_296
    assert counts["head"] == 768 * 37 + 37

    model, processor, _ = tiny
    v = model.config.vision_config
    net = add_lora(BlipVisionClassifier(copy.deepcopy(model.vision_model), 5), ("qkv",), ClassifierSettings())
    assert trainable_parameters(net) == {
        "lora": v.num_hidden_layers * 64 * (v.hidden_size + 3 * v.hidden_size),
        "head": v.hidden_size * 5 + 5,
        "total": v.num_hidden_layers * 64 * 4 * v.hidden_size + v.hidden_size * 5 + 5,
    }


# ---------------------------------------------------------------------------
# Another backbone: any transformers image classifier


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A random tiny ViTForImageClassification (5 labels) and its image processor, saved to a folder offline."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit import ViTImageProcessorPil

    out = str(tmp_path_factory.mktemp("tiny-vit"))
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_a_hub_image_classifier_gets_the_same_recipe(tiny_vit, tiny):
    _, _, splits = tiny
    backbone = load_backbone(tiny_vit, num_classes=8)
    assert backbone.num_classes == 8 and backbone.target_modules == ("q_proj", "v_proj")
    assert load_backbone(tiny_vit, num_classes=8).fingerprint == backbone.fingerprint  # the new head is left out
    result = run_classifier(backbone, splits["train"], splits["validation"], splits["test"], FAST)
    # LoRA on q and v of 2 layers, each r x (32 in + 32 out); the head 32 x 8 + 8
    assert result.trainable_parameters == {"lora": 2 * 2 * 8 * 64, "head": 32 * 8 + 8, "total": 2 * 2 * 8 * 64 + 264}
    assert result.logits.shape == (len(splits["test"]), 8) and (result.pred >= 0).all()
    assert result.backbone == tiny_vit


def test_bad_backbones_are_one_line(tiny_assets, tmp_path, monkeypatch, caplog):
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"), 3)
    with pytest.raises(UserError, match="holds no image classifier"):
        load_backbone(tiny_assets[0], 3)  # a BLIP folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="classifier"):
        assert load_backbone(BACKBONE_DEFAULT, 3) is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1 and "skipped" in caplog.text
    with pytest.raises(UserError, match="unreachable"):
        load_backbone("someone/not-cached-vit", 3)  # asked for by name: an error, as for CLIP


def test_half_precision_trains_the_adapters_in_fp32(tiny, backbone, tmp_path):
    """bfloat16 (autocast, as on a GPU, here on the CPU): frozen linears stored in bf16, LoRA and head in fp32 (and
    saved so); its predictions in bf16 agree with the same weights run in fp32 to bf16's precision."""
    model, processor, splits = tiny
    one = dataclasses.replace(FAST, epochs=1)
    trained = train_classifier(backbone, splits["train"], splits["validation"], one, dtype=torch.bfloat16)
    params = dict(trained.net.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert params["base_model.model.vision_model.encoder.layers.0.self_attn.qkv.base_layer.weight"].dtype == (
        torch.bfloat16
    )
    half = predict(trained, backbone.image_processor, splits["test"], 8, dtype=torch.bfloat16)
    full = predict(trained, backbone.image_processor, splits["test"], 8, dtype=torch.float32)
    np.testing.assert_allclose(half[1], full[1], atol=0.02 * np.abs(full[1]).max())
    save_classifier(str(tmp_path), "k", trained)
    assert {t.dtype for t in load_file(str(tmp_path / "classifier-k.safetensors")).values()} == {torch.float32}
