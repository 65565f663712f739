"""The fast paths of issue 13 against the slow ones they replace: same ids, same predictions."""

import os

import pytest
import torch

from demo import build_tiny_blip
from devices import DEVICE_DEFAULTS
from inference import greedy_caption_ids
from model import load_base_model


def _generate(model, embeds, max_new_tokens, **rules):
    """transformers' own greedy decoding from bos, as the project called it before (the reference)."""
    tc = model.config.text_config
    start = torch.full((embeds.shape[0], 1), tc.bos_token_id, dtype=torch.long)
    return model.text_decoder.generate(
        input_ids=start,
        eos_token_id=tc.sep_token_id,
        pad_token_id=tc.pad_token_id,
        encoder_hidden_states=embeds,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
        encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
        **rules,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_blip(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_loop_gives_generates_ids_to_the_length_limit(tiny_dir, dtype):
    """A random model that never writes [SEP]: every row runs to max_new_tokens."""
    model = load_base_model(tiny_dir, dtype=dtype).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        model.text_decoder.cls.predictions.bias.normal_(0, 2)
    embeds = 3 * torch.randn(9, 5, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(3))
    ours = greedy_caption_ids(model, embeds.to(dtype), max_new_tokens=12)
    assert ours.shape == (9, 13)
    assert torch.equal(ours, _generate(model, embeds.to(dtype), 12))


@pytest.mark.parametrize(
    "rules",
    [
        {"repetition_penalty": 1.5},
        {"repetition_penalty": 0.7},
        {"no_repeat_ngram_size": 1},
        {"no_repeat_ngram_size": 2},
        {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    ],
)
def test_repetition_rules_act_as_generates_on_the_greedy_loop(tiny_dir, rules):
    """A random model repeats itself: the penalties change its ids, and exactly as generate's processors do."""
    model = load_base_model(tiny_dir).eval()
    with torch.no_grad():
        torch.manual_seed(0)
        model.text_decoder.cls.predictions.bias.normal_(0, 2)
    embeds = 3 * torch.randn(6, 5, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(4))
    plain = greedy_caption_ids(model, embeds, max_new_tokens=14)
    ours = greedy_caption_ids(model, embeds, max_new_tokens=14, **rules)
    assert torch.equal(ours, _generate(model, embeds, 14, **rules))
    if rules.get("repetition_penalty", 1.0) > 1 or rules.get("no_repeat_ngram_size"):
        assert not torch.equal(ours, plain)  # the rules broke this random model's loop


def test_decoding_options_are_checked_before_anything_loads():
    from config import EvalConfig, PetConfig, parse_config
    from run_io import UserError

    for flag, value in (("--repetition_penalty", "0"), ("--no_repeat_ngram_size", "-1")):
        with pytest.raises(UserError, match=flag):
            parse_config((PetConfig, EvalConfig), [flag, value])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_loop_gives_generates_ids_when_rows_end_apart(demo_run, demo_adapter, dtype):
    """The trained demo adapter writes breed captions of different lengths: rows end at different
    steps and are padded after their [SEP], as generate pads them."""
    from data import load_image, load_splits
    from inference import image_embeddings
    from model import load_lora_for_inference

    model, processor = load_lora_for_inference(demo_adapter, dtype=dtype)
    records = load_splits(os.path.join(demo_run[0], "outputs/demo/pets"), 0.0)["test"][::5]
    pixels = processor.image_processor([load_image(r) for r in records], return_tensors="pt")["pixel_values"]
    embeds = image_embeddings(model, pixels.to(dtype))
    ours = greedy_caption_ids(model, embeds, max_new_tokens=16)
    assert torch.equal(ours, _generate(model, embeds, 16))
    tc = model.config.text_config
    ends = (ours == tc.sep_token_id).float().argmax(1)
    assert len(set(ends.tolist())) > 1 and (ours == tc.pad_token_id).any()


@pytest.fixture
def fresh_graph_check(monkeypatch):
    """A process that has not decoded with graphs yet: its self-check still to run."""
    import inference as inference_module

    check = inference_module.GraphSelfCheck()
    monkeypatch.setattr(inference_module, "graph_decoding", check)
    return check


@pytest.mark.slow
@pytest.mark.parametrize("max_new_tokens", [30, 3])
def test_graph_mode_bookkeeping_gives_generates_ids(
    demo_run, demo_adapter, monkeypatch, fresh_graph_check, caplog, max_new_tokens
):
    """With a CUDA graph the loop asks "all rows done?" only every few steps and cuts the steps past
    the end off afterwards. The capture itself needs a GPU (benchmarks/profile_gpu.py checks it
    there); here the graph is replaced by the plain step so the rest of that path runs on the CPU,
    and its self-check passes without a warning."""
    import inference as inference_module
    from data import load_image, load_splits
    from inference import image_embeddings
    from model import load_lora_for_inference

    calls = []

    def ungraphed(step, device):
        return lambda: (calls.append(1), step())

    monkeypatch.setattr(inference_module, "graphed_step", ungraphed)
    model, processor = load_lora_for_inference(demo_adapter)
    records = load_splits(os.path.join(demo_run[0], "outputs/demo/pets"), 0.0)["test"][::7]
    pixels = processor.image_processor([load_image(r) for r in records], return_tensors="pt")["pixel_values"]
    embeds = image_embeddings(model, pixels)
    reference = _generate(model, embeds, max_new_tokens)
    steps = reference.shape[1] - 1
    # check at steps that miss the real end, so that steps past it run and must be cut off
    check_every = next(k for k in (3, 4, 5, 7) if steps % k)
    monkeypatch.setitem(DEVICE_DEFAULTS["cpu"], "graph_check_every", check_every)
    with caplog.at_level("INFO", logger="inference"):
        ours = greedy_caption_ids(model, embeds, max_new_tokens=max_new_tokens, cuda_graph=True)
    assert torch.equal(ours, reference)
    if max_new_tokens == 30:  # every caption ends before the limit
        assert steps < max_new_tokens and steps < len(calls) < steps + check_every
    assert fresh_graph_check.passed and not fresh_graph_check.off
    assert [r.levelname for r in caplog.records if "self-check" in r.getMessage()] == ["INFO"]
    assert torch.equal(greedy_caption_ids(model, embeds, max_new_tokens, cuda_graph=False), reference)


def test_a_graph_that_corrupts_one_id_is_caught_and_turned_off_with_one_warning(
    tiny_dir, monkeypatch, fresh_graph_check, caplog
):
    """A "graph" that writes one wrong id (row 1, token 3): the self-check on the first graphed batch warns once,
    naming that position, returns the plain loop's ids, and later batches are decoded plainly (the graph is
    not used again, and no second warning comes)."""
    import inference as inference_module

    model = load_base_model(tiny_dir).eval()
    vocab = model.config.text_config.vocab_size
    captures = []

    def corrupting(step, device):
        state, calls = step.__self__, []
        captures.append(1)

        def replay():
            step()
            calls.append(1)
            if len(calls) == 3:  # ids[:, 1:4] are written: change row 1's third token, which step 4 then reads
                state.ids[1, 3] = (state.ids[1, 3] + 1) % vocab

        return replay

    monkeypatch.setattr(inference_module, "graphed_step", corrupting)
    embeds = torch.randn(3, 5, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(2))
    other = torch.randn(2, 5, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(4))
    with caplog.at_level("INFO", logger="inference"):
        first = greedy_caption_ids(model, embeds, 8, cuda_graph=True)
        second = greedy_caption_ids(model, other, 8, cuda_graph=True)
        default = greedy_caption_ids(model, other, 8)
    assert torch.equal(first, _generate(model, embeds, 8)) and torch.equal(second, _generate(model, other, 8))
    assert torch.equal(default, second)
    assert captures == [1]  # the graph was tried on the first batch only
    messages = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(messages) == 1 and caplog.records[-1].levelname == "WARNING", messages
    assert "row 1, token 3" in messages[0] and "without CUDA graphs" in messages[0]
    assert fresh_graph_check.off and not fresh_graph_check.passed


def test_first_difference_names_the_earliest_token_then_the_row():
    from inference import first_difference

    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert first_difference(a, a.clone()) is None
    b = a.clone()
    b[0, 3], b[1, 2] = 9, 8
    assert first_difference(a, b) == (1, 2, 3, 8)  # token 2 comes before token 3, whatever the row
    b[0, 2] = 7
    assert first_difference(a, b) == (0, 2, 3, 7)
    assert first_difference(a[:, :3], a) == (0, 3, -1, 4)  # a shorter decode differs where it ends


@pytest.mark.skipif(torch.cuda.is_available(), reason="uses a machine without CUDA, where every capture fails")
def test_a_failed_graph_capture_falls_back_to_plain_steps_with_one_warning(tiny_dir, fresh_graph_check, caplog):
    """Where capture fails (here: no CUDA at all), decoding goes on without the graph: same ids, one warning,
    and graphs stay off for the process."""
    model = load_base_model(tiny_dir).eval()
    embeds = torch.randn(3, 5, model.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="inference"):
        first = greedy_caption_ids(model, embeds, 10, cuda_graph=True)
        second = greedy_caption_ids(model, embeds, 10, cuda_graph=True)
    assert torch.equal(first, _generate(model, embeds, 10)) and torch.equal(second, first)
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert "decoding without CUDA graphs" in caplog.records[0].message and "capture failed" in caplog.records[0].message
    assert fresh_graph_check.off


@pytest.mark.slow  # a base-sized (224M parameters) random model
def test_greedy_loop_gives_generates_ids_base_sized(tmp_path):
    model = load_base_model(build_tiny_blip(str(tmp_path / "base"), base_sized=True)).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] += 8.0
    embeds = torch.randn(3, 577, 768, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_caption_ids(model, embeds, 8), _generate(model, embeds, 8))


@pytest.mark.parametrize("workers", [0, 1])
def test_pixel_batches_match_the_processor_in_order_and_skip_bad_images(tmp_path, workers):
    from transformers.models.blip import BlipImageProcessorPil

    from data import Record, load_image, load_splits, pixel_batches
    from demo import write_synthetic_pets

    write_synthetic_pets(str(tmp_path), breeds=range(8), trainval_per_breed=10, test_per_breed=1, size=64)
    records = load_splits(str(tmp_path), 0.0)["train"]
    records.insert(5, Record("missing", 0, str(tmp_path / "nope.jpg")))
    records.insert(40, Record("missing2", 1, str(tmp_path / "nope2.jpg")))
    good = [r for r in records if not r.image_id.startswith("missing")]
    processor = BlipImageProcessorPil(size={"height": 64, "width": 64})
    reference = processor([load_image(r) for r in good], return_tensors="pt")["pixel_values"]
    for batch_size in (7, 50, 100):
        device = torch.device("cpu") if batch_size == 50 else None  # batches joined on a device: same values
        batches, bad = pixel_batches(records, processor, batch_size, num_workers=workers, device=device)
        out = list(batches)
        assert [r.image_id for b, _ in out for r in b] == [r.image_id for r in good]
        assert torch.equal(torch.cat([px for _, px in out]), reference)
        assert all(len(b) == batch_size for b, _ in out[:-1])  # full batches though two images are unreadable
        assert sorted(bad) == ["missing", "missing2"]
