"""The training step's speed-ups change no numbers: frozen weights stored in autocast's dtype, fixed-length padding."""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file

import train
import trainer
from data import CaptionCollator, longest_caption_tokens
from helpers import demo_argv
from labels import BREED_NAMES, NUM_BREEDS, OXFORD_PETS, PETS_TEMPLATE
from model import cast_frozen_linears, create_lora_model, load_base_model, load_processor
from run_io import UserError

TEMPLATE = PETS_TEMPLATE


@pytest.fixture(scope="module")
def pretrained_like(tiny_assets):
    """The tiny demo model with every weight nudged off its initial value: fresh LayerNorms (1 and 0)
    and zero biases are exact in bf16, so casting them wrongly would change no number and no test could see it."""
    model_dir, _ = tiny_assets
    model = load_base_model(model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model, load_processor(model_dir)


def _batch(model, processor, n=4):
    collate = CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)
    batch = collate(
        [{"caption": OXFORD_PETS.caption(i % NUM_BREEDS, TEMPLATE)} for i in range(n)]
    )  # lengths differ: padding
    vision = model.config.vision_config
    shape = (n, (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)
    batch["image_embeds"] = torch.randn(
        shape, generator=torch.Generator().manual_seed(1)
    ).half()  # as the cache stores them
    return batch


def _steps(model, batch, dtype, steps=2):
    """(loss, LoRA gradients) of `steps` optimizer steps under CPU autocast, as Trainer takes them:
    clipped, AdamW, and for fp16 through a GradScaler (which refuses half-precision gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=dtype == torch.float16)
    model.train()
    out = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        out.append((loss.detach(), [p.grad.clone() for p in params]))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_linears_stored_in_autocast_dtype_change_no_number(pretrained_like, dtype):
    base, processor = pretrained_like
    plain = create_lora_model(copy.deepcopy(base), 4, 8, 0.0, "query,value,key,dense")
    cast = copy.deepcopy(plain)  # the same LoRA initialisation
    count = cast_frozen_linears(cast, dtype)

    params = dict(cast.named_parameters(remove_duplicate=False))
    linears = {n for n, m in cast.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    head = "base_model.model.text_decoder.cls.predictions.decoder"
    expected = {n for n in params if n.rsplit(".", 1)[0] in linears and not n.startswith(head)}
    assert count == len(expected) > 0
    assert all((p.dtype == dtype) == (n in expected) for n, p in params.items()), "only frozen, untied Linear tensors"
    assert params[f"{head}.weight"] is params["base_model.model.text_decoder.bert.embeddings.word_embeddings.weight"]
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)
    decoder = cast.get_base_model().text_decoder
    assert decoder.dtype == cast.get_base_model().dtype == torch.float32  # what forward casts cached embeddings to

    batch = _batch(base, processor)
    for (loss, grads), (loss_cast, grads_cast) in zip(_steps(plain, batch, dtype), _steps(cast, batch, dtype)):
        assert torch.equal(loss, loss_cast)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))


def test_dora_keeps_its_targets_and_magnitudes_fp32_and_the_cast_changes_no_number(pretrained_like):
    """DoRA reads each target's weight itself (outside autocast's cast) for the norm its magnitudes divide by: cast,
    that norm would be of rounded weights. So its targets stay fp32, as do its magnitudes (trained)."""
    base, processor = pretrained_like
    plain = create_lora_model(copy.deepcopy(base), 4, 8, 0.0, "query,value", use_dora=True)
    cast = copy.deepcopy(plain)
    assert cast_frozen_linears(cast, torch.bfloat16) > 0
    for name, module in cast.named_modules():
        if name.endswith((".query", ".value")) and hasattr(module, "base_layer"):
            assert (
                module.base_layer.weight.dtype == module.lora_magnitude_vector["default"].weight.dtype == torch.float32
            )
    key = next(n for n, m in cast.named_modules() if n.endswith("attention.self.key"))
    assert cast.get_submodule(key).weight.dtype == torch.bfloat16  # not a DoRA target: cast
    batch = _batch(base, processor)
    for (loss, grads), (loss_cast, grads_cast) in zip(
        _steps(plain, batch, torch.bfloat16), _steps(cast, batch, torch.bfloat16)
    ):
        assert torch.equal(loss, loss_cast)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))


def test_the_comparison_sees_a_cast_of_the_tied_head(pretrained_like):
    """Casting the LM head (tied to the word embeddings) by hand changes the loss: equality above means something."""
    base, processor = pretrained_like
    plain = create_lora_model(copy.deepcopy(base), 4, 8, 0.0, "query,value")
    wrong = copy.deepcopy(plain)
    head = wrong.get_base_model().text_decoder.cls.predictions.decoder
    head.weight.data = head.weight.data.to(torch.bfloat16)
    batch = _batch(base, processor)
    assert not torch.equal(_steps(plain, batch, torch.bfloat16, 1)[0][0], _steps(wrong, batch, torch.bfloat16, 1)[0][0])
    with pytest.raises(ValueError, match="half-precision"):
        cast_frozen_linears(plain, torch.float32)


def test_fixed_length_padding_gives_the_per_batch_loss(pretrained_like):
    """--torch_compile pads every batch to the longest caption of any breed: the loss is the per-batch padding's."""
    base, processor = pretrained_like
    tokenizer, bos = processor.tokenizer, base.config.text_config.bos_token_id
    length = longest_caption_tokens(tokenizer, OXFORD_PETS, TEMPLATE)
    items = [
        {"caption": OXFORD_PETS.caption(BREED_NAMES.index(name), TEMPLATE)}
        for name in ("Beagle", "Bengal", "Pug", "Boxer")
    ]
    per_batch = CaptionCollator(tokenizer, bos)(items)
    fixed = CaptionCollator(tokenizer, bos, pad_to=length)(items)
    short = per_batch["input_ids"].shape[1]
    assert fixed["input_ids"].shape[1] == length > short
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(fixed[key][:, :short], per_batch[key])
    assert (fixed["attention_mask"][:, short:] == 0).all() and (fixed["labels"][:, short:] == -100).all()

    model = create_lora_model(copy.deepcopy(base), 4, 8, 0.0, "query,value").eval()
    embeds = _batch(base, processor, len(items))["image_embeds"]
    with torch.no_grad():
        losses = [model(image_embeds=embeds, **batch).loss.item() for batch in (per_batch, fixed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="longer than pad_to"):
        CaptionCollator(tokenizer, bos, pad_to=short - 1)(items)


def test_loss_on_labelled_positions_is_blips_loss(pretrained_like):
    """The training loss (BlipForPetCaptioning.caption_loss, the LM head on labelled positions only) is BLIP's
    own text-decoder loss, label smoothing and padding included, and so are its gradients."""
    base, processor = pretrained_like
    items = [
        {"caption": OXFORD_PETS.caption(BREED_NAMES.index(name), TEMPLATE)}
        for name in ("Pug", "American Pit Bull Terrier", "Bengal")
    ]
    batch = CaptionCollator(processor.tokenizer, base.config.text_config.bos_token_id)(items)
    assert (batch["labels"] == -100).any()  # padding, which BLIP's loss must ignore
    embeds = _batch(base, processor, len(items))["image_embeds"].float()
    model = create_lora_model(copy.deepcopy(base), 4, 8, 0.0, "query,value")
    model.get_base_model().text_decoder.label_smoothing = 0.1  # checked too (the checkpoint's config leaves it at 0)
    losses, grads = [], []
    for ours in (True, False):
        model.zero_grad()
        inner = model.get_base_model()
        if ours:
            loss = model(image_embeds=embeds, **batch).loss
        else:
            loss = inner.text_decoder(encoder_hidden_states=embeds, reduction="mean", **batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8) and grads[0].abs().sum() > 0


def _bf16_run(tiny_assets, out, cache, *extra):
    argv = [
        *demo_argv(tiny_assets, str(out)),
        "--embedding_cache_dir",
        str(cache),
        "--precision",
        "bf16",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--max_new_tokens",
        "4",
        *extra,
        # the lower validation loss picks the best checkpoint: the last one here (every accuracy is 0 this early)
        "--metric_for_best_model",
        "loss",
        "--greater_is_better",
        "False",
    ]
    result = train.main(argv)
    return result["history"], load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.slow
def test_bf16_training_run_is_unchanged_by_the_cast(tiny_assets, tmp_path, monkeypatch):
    """Through Trainer (its autocast, validation captions, checkpoints, best model at the end, resume):
    the same losses, accuracies and adapter as with fp32 base weights, and the adapter stays fp32."""
    cast_history, cast_adapter = _bf16_run(tiny_assets, tmp_path / "cast", tmp_path / "cache")
    resumed_history, resumed_adapter = _bf16_run(
        tiny_assets,
        tmp_path / "cast",
        tmp_path / "cache",
        "--resume_from_checkpoint",
        str(tmp_path / "cast" / "checkpoint-2"),
    )
    monkeypatch.setattr(train, "cast_frozen_linears", lambda model, dtype: 0)
    plain_history, plain_adapter = _bf16_run(tiny_assets, tmp_path / "plain", tmp_path / "cache")
    assert cast_history == plain_history and len(cast_history["validation"]) == 2
    assert cast_adapter.keys() == plain_adapter.keys()
    assert all(t.dtype == torch.float32 and torch.equal(t, plain_adapter[k]) for k, t in cast_adapter.items())
    # resumed at step 2 of 4: steps 3 and 4, and the best (last) checkpoint, as in the uninterrupted run
    assert resumed_history["train"][-2:] == cast_history["train"][-2:]
    assert all(torch.equal(t, cast_adapter[k]) for k, t in resumed_adapter.items())


@pytest.mark.slow
def test_compiled_training_is_one_graph_with_eagers_losses(tiny_assets, tmp_path):
    """--torch_compile True: PEFT + BlipForPetCaptioning.forward compile without graph breaks, the fixed padding
    gives every batch one shape (16 images in batches of 4: no partial batch; the captions' lengths differ), and
    the losses are eager's."""
    from torch._dynamo.utils import counters

    model_dir, data_dir = tiny_assets
    argv = [
        "--demo",
        "--model_name_or_path",
        model_dir,
        "--dataset",
        data_dir,
        "--embedding_cache_dir",
        str(tmp_path / "cache"),
        "--max_steps",
        "4",
        "--max_train_samples",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "False",
        "--lora_dropout",
        "0",
    ]  # the real recipe's dropout draws masks differently compiled and eager
    eager = train.main(argv + ["--output_dir", str(tmp_path / "eager")])
    assert eager["trainer"].data_collator.pad_to is None  # without compile: each batch padded to its own longest
    torch._dynamo.reset()
    counters.clear()
    compiled = train.main(argv + ["--output_dir", str(tmp_path / "compiled"), "--torch_compile", "True"])
    assert compiled["trainer"].data_collator.pad_to == longest_caption_tokens(
        load_processor(model_dir).tokenizer, OXFORD_PETS, TEMPLATE
    )
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # compiled once: no recompilation
    losses = [[e["loss"] for e in run["history"]["train"]] for run in (eager, compiled)]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def _graphs_run(tiny_assets, out, *extra):
    argv = [
        *demo_argv(tiny_assets, str(out)),
        "--embedding_cache_dir",
        str(out.parent / "cache"),
        "--max_steps",
        "6",
        "--lora_dropout",
        "0.1",
        "--max_train_samples",
        "18",
        "--per_device_train_batch_size",
        "4",  # 4 full batches and one of 2 per epoch
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "False",
        *extra,
    ]
    result = train.main(argv)
    return [e["loss"] for e in result["history"]["train"]], load_file(str(out / "adapter_model.safetensors")), result


def _failing(module, sample_args):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def eager_graphs_run(tiny_assets, tmp_path_factory):
    """--cuda_graphs whose recording fails: every step eager, with the fixed padding (the reference)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "graphs_supported", lambda device: True)
        mp.setattr(torch.cuda, "make_graphed_callables", _failing)
        losses, adapter, _ = _graphs_run(
            tiny_assets, tmp_path_factory.mktemp("failed") / "run", "--cuda_graphs", "True"
        )
    return losses, adapter


def _graph_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--cuda_graphs" in r.getMessage()]


def test_cuda_graphs_take_full_batches_and_give_eagers_training(
    tiny_assets, eager_graphs_run, tmp_path, monkeypatch, caplog
):
    """--cuda_graphs, with a stand-in for torch.cuda.make_graphed_callables (no GPU here): recorded once, on the
    first batch's shapes; full batches go through it, the partial one eagerly; the self-check passes without a
    warning. Same losses (LoRA dropout on) and adapter as the run whose recording failed (every step eager), and
    that run warned once. (Fixed padding against each batch's own:
    test_fixed_length_padding_gives_the_per_batch_loss.)"""
    recorded, replays = [], []

    def stand_in(module, sample_args):
        recorded.append([tuple(a.shape) for a in sample_args])
        return lambda *args: replays.append([tuple(a.shape) for a in args]) or module(*args)

    monkeypatch.setattr(train, "graphs_supported", lambda device: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    with caplog.at_level("INFO", logger="trainer"):
        losses, adapter, result = _graphs_run(tiny_assets, tmp_path / "graphs", "--cuda_graphs", "True")
    pad_to = result["trainer"].data_collator.pad_to
    assert pad_to == longest_caption_tokens(load_processor(tiny_assets[0]).tokenizer, OXFORD_PETS, TEMPLATE)
    assert len(recorded) == 1 and recorded[0][0][0] == 4 and recorded[0][1:] == [(4, pad_to)] * 3
    # steps 1-4 and 6 (step 5 has 2 images: eager), and the self-check's replay of step 1
    assert len(replays) == 6 and all(r == recorded[0] for r in replays)
    assert not _graph_warnings(caplog)
    assert sum("self-check passed: --cuda_graphs" in r.getMessage() for r in caplog.records) == 1

    eager_losses, eager_adapter = eager_graphs_run
    assert len(losses) == 6 and losses == eager_losses
    assert all(torch.equal(t, eager_adapter[k]) for k, t in adapter.items())


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient scaled on the way back: a replay whose loss is right and gradients wrong."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@pytest.mark.parametrize("wrong", ["loss", "gradients", "inputs"])
def test_a_replay_off_by_more_than_the_tolerance_falls_back_to_eager_steps(
    tiny_assets, eager_graphs_run, tmp_path, monkeypatch, caplog, wrong
):
    """A recorder whose replay is off by 3x the fp32 tolerance (the loss, or only the gradients), or replays the
    batch it was recorded on whatever it is given (inputs): the first replayed step's self-check sees it, warns
    once naming both differences, and that step and all later ones are eager: the eager run's losses and
    adapter. The check's own forward passes leave the RNG (LoRA dropout) as it was."""
    factor = 1 + 3 * trainer.GraphedLoss.TOLERANCE[torch.float32]
    replays = []

    def off(module, sample_args):
        def replay(*args):
            replays.append(1)
            loss = module(*(sample_args if wrong == "inputs" else args))
            return loss * factor if wrong == "loss" else _ScaledGradient.apply(loss, factor)

        return replay

    monkeypatch.setattr(train, "graphs_supported", lambda device: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", off)
    with caplog.at_level("INFO", logger="trainer"):
        losses, adapter, _ = _graphs_run(tiny_assets, tmp_path / "off", "--cuda_graphs", "True")
    warnings = _graph_warnings(caplog)
    assert len(warnings) == 1 and "self-check" in warnings[0] and "runs eagerly" in warnings[0], warnings
    diffs = re.search(r"loss ([\d.e+-]+), LoRA gradients ([\d.e+-]+); tolerance ([\d.e+-]+)", warnings[0])
    loss_diff, grad_diff, tolerance = map(float, diffs.groups())
    assert tolerance == trainer.GraphedLoss.TOLERANCE[torch.float32]
    if (
        wrong == "inputs"
    ):  # recorded on another batch of the same shapes: the gradients show it (the loss less so at step 1)
        assert grad_diff > 10 * tolerance
    else:
        assert loss_diff == pytest.approx(factor - 1 if wrong == "loss" else 0.0, rel=0.02, abs=1e-7)
        assert grad_diff == pytest.approx(factor - 1, rel=0.02)
    assert replays == [1]  # only the check's
    assert not any("self-check passed" in r.getMessage() for r in caplog.records)
    eager_losses, eager_adapter = eager_graphs_run
    assert losses == eager_losses
    assert all(torch.equal(t, eager_adapter[k]) for k, t in adapter.items())


def test_the_failed_recording_warned_once(tiny_assets, tmp_path, monkeypatch, caplog):
    """Recording that raises: exactly one warning, with the recorder's message, and no self-check."""
    monkeypatch.setattr(train, "graphs_supported", lambda device: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", _failing)
    with caplog.at_level("INFO", logger="trainer"):
        _graphs_run(tiny_assets, tmp_path / "failed", "--cuda_graphs", "True", "--max_steps", "2")
    warnings = _graph_warnings(caplog)
    assert len(warnings) == 1 and "stream is capturing" in warnings[0] and "runs eagerly" in warnings[0]
    assert not any("self-check" in r.getMessage() for r in caplog.records)


def test_relative_difference():
    assert trainer.relative_difference(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert trainer.relative_difference(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0])) == pytest.approx(0.2)
    assert trainer.relative_difference(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert (
        trainer.relative_difference(torch.tensor([1e-3]), torch.tensor([0.0])) > 1e30
    )  # any difference from zero fails
    assert trainer.relative_difference(torch.zeros(3), torch.zeros(3)) == 0.0


def test_cuda_graph_option_errors_are_one_line(tiny_assets, tmp_path, monkeypatch):
    argv = [
        *demo_argv(tiny_assets, str(tmp_path / "x")),
        "--cuda_graphs",
        "True",
    ]
    with pytest.raises(UserError, match="--cuda_graphs needs a CUDA GPU"):
        train.parse_args(argv)
    monkeypatch.setattr(train, "graphs_supported", lambda device: True)
    with pytest.raises(UserError, match="pass one of them"):
        train.parse_args(argv + ["--torch_compile", "True"])
    with pytest.raises(UserError, match="cannot accumulate gradients"):
        train.parse_args(argv + ["--gradient_accumulation_steps", "2"])
