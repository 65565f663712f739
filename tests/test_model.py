"""model.py: the base model's and the adapter's checks: one line for every broken file, never a silently wrong model."""

import json
import os
import shutil

import pytest
import torch

import app
import evaluate
import explainability
import run_io
import train
from demo import build_tiny_blip
from helpers import RunsCode, adapter_copy, edit_json, train_argv
from model import check_finite_model, create_lora_model, load_base_model, load_lora_for_inference, load_processor
from run_io import UserError

# ---------------------------------------------------------------------------
# Base models


def test_base_model_without_decoder_weights_is_refused(tiny_assets, tmp_path):
    from safetensors.torch import load_file, save_file

    base = str(tmp_path / "base")
    shutil.copytree(tiny_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("text_decoder.")}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks .* weights .* incomplete"):
        load_base_model(base)


def test_truncated_base_weights_and_garbled_tokenizer_are_one_line(tiny_assets, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(tiny_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_base_model(base)
    open(os.path.join(base, "tokenizer.json"), "w").write('{"version": "1.0", "model": {"type": "Nonsense"')
    with pytest.raises(UserError, match="processor files .* are corrupt"):
        load_processor(base)


def test_a_hostile_pytorch_model_bin_is_refused_without_running_code(tmp_path):
    """The Hub's base checkpoint is pytorch_model.bin: it must load with weights_only=True (torch >= 2.6)."""
    from demo import build_tiny_blip

    folder = build_tiny_blip(str(tmp_path / "base"), hidden=32)
    for name in os.listdir(folder):
        if name.startswith("model") and name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    marker = tmp_path / "code-ran"
    torch.save({"text_decoder.cls.predictions.bias": RunsCode(str(marker))}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(UserError, match="cannot load the model"):
        load_base_model(folder)
    assert not marker.exists()
    requirement = next(
        line
        for line in open(os.path.join(run_io.__file__.rsplit(os.sep, 1)[0], "requirements.txt"))
        if line.startswith("torch")
    )
    assert requirement.split("#")[0].strip() == "torch>=2.6"


@pytest.fixture(scope="module")
def nan_base(tiny_assets, tmp_path_factory):
    """The tiny base model with one decoder weight set to NaN."""
    from safetensors.torch import load_file, save_file

    base = str(tmp_path_factory.mktemp("nan") / "base")
    shutil.copytree(tiny_assets[0], base)
    weights = os.path.join(base, "model.safetensors")
    state = load_file(weights)
    state["text_decoder.bert.encoder.layer.1.attention.self.query.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("script", ["train", "evaluate", "explainability", "app"])
def test_every_script_refuses_a_base_model_with_nan_weights(
    script, nan_base, tiny_adapter, tiny_assets, tmp_path, monkeypatch
):
    monkeypatch.setattr(app, "build_ui", lambda *a: pytest.fail("the app served a model with NaN weights"))
    out = str(tmp_path / "out")
    common = ["--model_name_or_path", nan_base, "--dataset", tiny_assets[1], "--output_dir", out]
    argv = {
        "train": train_argv(tiny_assets, out, tmp_path / "cache")[:1]
        + common
        + ["--max_steps", "1", "--embedding_cache_dir", str(tmp_path / "cache")],
        "evaluate": common + ["--adapter", tiny_adapter[0], "--max_eval_samples", "4"],
        "explainability": common + ["--adapter", tiny_adapter[0], "--num_images", "2"],
        "app": common + ["--adapter", tiny_adapter[0], "--num_examples", "0"],
    }[script]
    main = {"train": train.main, "evaluate": evaluate.main, "explainability": explainability.main, "app": app.main}[
        script
    ]
    with pytest.raises(
        UserError, match=r"has NaN or infinite weights \(first: text_decoder\.bert\.encoder\.layer\.1\."
    ):
        main(argv)
    written = set(os.listdir(out)) - {".lock"} if os.path.isdir(out) else set()
    assert not written, written


def test_a_sound_model_passes_the_check(tiny_assets):
    from model import load_base_model

    model = load_base_model(tiny_assets[0])
    check_finite_model(model, "the tiny model", "")
    with torch.no_grad():
        model.text_decoder.bert.embeddings.word_embeddings.weight[3, 0] = float("inf")  # a row no probe looks up
    with pytest.raises(UserError, match="word_embeddings"):
        check_finite_model(model, "the tiny model", "")


# ---------------------------------------------------------------------------
# Adapters: one clear error, never a zero-shot model reported as fine-tuned


def _broken_adapter(adapter, tmp_path, case):
    path = tmp_path / case
    if case == "missing":
        return str(path)
    shutil.copytree(adapter, path, ignore=shutil.ignore_patterns("checkpoint-*"))
    if case == "no_config":
        os.remove(path / "adapter_config.json")
    elif case == "no_weights":
        os.remove(path / "adapter_model.safetensors")
    elif case == "pickle_only":
        os.remove(path / "adapter_model.safetensors")
        torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    elif case == "corrupt":
        raw = open(path / "adapter_model.safetensors", "rb").read()
        open(path / "adapter_model.safetensors", "wb").write(raw[: len(raw) // 3])
    elif case in ("other_shape", "other_image_size"):
        # same module names, another hidden size; of the adapter's image size or another
        other = build_tiny_blip(str(tmp_path / "other-base"), image_size=64 if case == "other_shape" else 32)
        cfg = json.load(open(path / "adapter_config.json"))
        json.dump({**cfg, "base_model_name_or_path": _wider(other)}, open(path / "adapter_config.json", "w"))
    elif case == "base_moved":  # trained elsewhere: the recorded base folder is not on this machine
        cfg = json.load(open(path / "adapter_config.json"))
        json.dump(
            {**cfg, "base_model_name_or_path": "outputs/elsewhere/tiny-blip"}, open(path / "adapter_config.json", "w")
        )
    return str(path)


def _wider(path):
    cfg = json.load(open(os.path.join(path, "config.json")))
    from transformers import BlipConfig

    from model import BlipForPetCaptioning

    cfg["text_config"]["hidden_size"] = 96
    model = BlipForPetCaptioning(BlipConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"]))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("no_config", "no adapter_config.json"),
        ("no_weights", "no adapter_model.safetensors"),
        ("pickle_only", "refused: only safetensors"),
        ("corrupt", "corrupt or truncated"),
        ("other_shape", "trained on a base model of another shape"),
        (
            "other_image_size",
            "does not fit the base model: it has 30524 tokens and 64px images, the model 30524 tokens and 32px",
        ),
        ("base_moved", "outputs/elsewhere/tiny-blip' does not exist; pass an existing folder to --model_name_or_path"),
    ],
)
def test_broken_adapter_is_one_clear_error(case, message, tiny_adapter, tmp_path):
    with pytest.raises(UserError, match=message):
        load_lora_for_inference(_broken_adapter(tiny_adapter[0], tmp_path, case))


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "adapter_model.safetensors")
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case,message",
    [
        ("nan", "NaN or infinite weights"),
        ("inf", "NaN or infinite weights"),
        ("renamed", "match no LoRA module"),
        ("targets", "does not fit its own adapter_config.json"),
        ("garbled_tokenizer", "processor files .* are corrupt"),
    ],
)
def test_broken_adapter_is_refused(tiny_adapter, tmp_path, case, message):
    path = adapter_copy(tiny_adapter, tmp_path)
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


@pytest.mark.parametrize("merge", [True, False])
def test_adapter_scaled_to_overflow_is_refused(tiny_adapter, tmp_path, merge):
    from model import load_lora_for_inference

    path = adapter_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(path, "adapter_config.json"), lora_alpha=1e30)  # every stored tensor stays finite
    with pytest.raises(UserError, match=r"lora_alpha 1e\+30.*NaN or infinite"):
        load_lora_for_inference(path, merge=merge)


# ---------------------------------------------------------------------------
# The vision encoder's attention


def test_sdpa_vision_attention_matches_eager(tiny_assets):
    """The fused vision attention gives eager's outputs and gradients, and eager's weights when asked."""
    from transformers.models.blip.modeling_blip import BlipAttention

    from model import BlipVisionSdpaAttention, set_vision_attention

    model = load_base_model(tiny_assets[0])
    attentions = [m for m in model.modules() if isinstance(m, BlipAttention)]
    assert attentions and all(type(m) is BlipVisionSdpaAttention for m in attentions)  # the default
    # LoRA inside the vision attention too, without LoRA's dropout: BLIP's own is 0, so train mode is deterministic
    model = create_lora_model(model, dropout=0.0, target_modules="qkv,query,value")
    model.train()
    pixels = torch.randn(3, 3, *[model.config.vision_config.image_size] * 2, generator=torch.Generator().manual_seed(0))
    results = {}
    for implementation in ("eager", "sdpa"):
        set_vision_attention(model, implementation)
        model.zero_grad()
        out = model.vision_model(pixel_values=pixels).last_hidden_state
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results[implementation] = out.detach(), grads
    (eager_out, eager_grads), (sdpa_out, sdpa_grads) = results["eager"], results["sdpa"]
    assert any("vision_model" in n for n in eager_grads) and eager_grads.keys() == sdpa_grads.keys()
    assert torch.allclose(eager_out, sdpa_out, atol=1e-4)
    for name, g in eager_grads.items():
        assert torch.allclose(g, sdpa_grads[name], atol=1e-4 * max(1.0, g.abs().max().item())), name
    # output_attentions still returns real attention weights (eager fallback): rows sum to 1
    weights = model.vision_model(pixel_values=pixels, output_attentions=True).attentions
    assert len(weights) == len(attentions) and all(w is not None for w in weights)
    assert torch.allclose(weights[0].sum(-1), torch.ones(()), atol=1e-5)


def test_an_adapter_on_base_weights_rebuilt_in_place_is_refused(tiny_adapter, tiny_assets, tmp_path):
    """The base folder an adapter names now holds other weights (a demo base rebuilt under its adapters): one line,
    not a fine-tuned model that silently scores nothing."""
    base = str(tmp_path / "base")
    shutil.copytree(tiny_assets[0], base)  # the same files: the same fingerprint as the adapter's run recorded
    adapter = adapter_copy(tiny_adapter, tmp_path)
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=base)
    argv = ["--adapter", adapter, "--num_images", "1", "--output_dir", str(tmp_path / "explain")]
    explainability.main(argv)
    build_tiny_blip(base, seed=1)  # other random weights, in place
    with pytest.raises(UserError, match="trained on other weights than .* holds now"):
        explainability.main(argv)


# ---------------------------------------------------------------------------
# PEFT's LoRA variants: DoRA and rsLoRA


def test_rslora_scales_by_the_square_root_of_r_and_dora_adds_magnitudes(tiny_assets):
    from model import adapter_variant

    base = load_base_model(tiny_assets[0])
    plain = create_lora_model(base, 4, 8, 0.0, "query,value")
    query = plain.get_base_model().text_decoder.bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == 8 / 4
    rs = create_lora_model(load_base_model(tiny_assets[0]), 4, 8, 0.0, "query,value", use_rslora=True)
    query = rs.get_base_model().text_decoder.bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == 8 / 4**0.5
    dora = create_lora_model(load_base_model(tiny_assets[0]), 4, 8, 0.0, "query,value", use_dora=True)
    query = dora.get_base_model().text_decoder.bert.encoder.layer[0].attention.self.query
    magnitude = query.lora_magnitude_vector["default"].weight
    # DoRA starts from the base weight's own norms: one per output, so the wrapped layer is the base layer at first
    assert magnitude.requires_grad and torch.allclose(magnitude, query.base_layer.weight.norm(dim=1))
    variants = {(d, r): adapter_variant({"use_dora": d, "use_rslora": r}) for d in (False, True) for r in (False, True)}
    assert variants == {
        (False, False): "LoRA",
        (False, True): "rsLoRA",
        (True, False): "DoRA",
        (True, True): "DoRA + rsLoRA",
    }
    assert adapter_variant({}) == "LoRA"  # an adapter_config.json from a PEFT before the variants


@pytest.mark.slow
def test_a_dora_rslora_run_records_its_variant_and_reloads(tiny_dora_adapter):
    from safetensors import safe_open

    from model import adapter_variant

    folder, _ = tiny_dora_adapter
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (config["use_dora"], config["use_rslora"]) == (True, True)
    assert adapter_variant(config) == "DoRA + rsLoRA"
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert any("lora_magnitude_vector" in k for k in stored) and all(t.dtype == torch.float32 for t in stored.values())
    card = open(os.path.join(folder, "README.md")).read()
    assert "**Adapter**: DoRA + rsLoRA, r=32" in card and "- dora\n" in card and "- rslora\n" in card
    # reloaded, the adapter changes the model, and merged into the base weights it is the same model
    model, _ = load_lora_for_inference(folder, merge=False)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[model.config.text_config.bos_token_id, 1037, 6302]] * 2)
    with torch.no_grad():
        unmerged = model(pixel_values=pixels, input_ids=ids).logits
        with model.disable_adapter():
            zero_shot = model(pixel_values=pixels, input_ids=ids).logits
        merged = model.merge_and_unload()(pixel_values=pixels, input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5) and not torch.allclose(unmerged, zero_shot, atol=1e-4)


@pytest.mark.slow
def test_evaluate_reports_the_adapters_variant(tiny_dora_adapter, tmp_path):
    folder, _ = tiny_dora_adapter
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--adapter",
            folder,
            "--output_dir",
            str(out),
            "--max_eval_samples",
            "4",
            "--max_new_tokens",
            "3",
            "--bootstrap_samples",
            "10",
            "--linear_probe",
            "False",
            "--clip_model",
            "none",
        ]
    )
    assert json.load(open(out / "metrics.json"))["adapter_variant"] == "DoRA + rsLoRA"
    assert f"- adapter `{folder}` (DoRA + rsLoRA) on base model" in (out / "report.md").read_text()
