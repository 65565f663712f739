"""Images per second of evaluate.py's work, per image (as the original did it) vs batched.

    python benchmarks/eval_speed.py                 # demo adapter (train it first) and a base-sized random BLIP
    python benchmarks/eval_speed.py --images 8 --skip_base

per-image : model.generate(pixel_values) for one image at a time, each model separately (the original).
batched   : evaluate.evaluate_batch: the vision encoder once per batch, shared by both models, batched
            greedy captions; reported without and with the 37-breed likelihood ranking.
The base-sized model is random (built offline from DESIGN.md's config), so its captions run to
max_new_tokens; its "fine-tuned" twin is a copy (a merged LoRA has the same shapes and cost).
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import DEMO_DIR, PetConfig  # noqa: E402
from data import load_image, load_splits  # noqa: E402
from evaluate import evaluate_batch  # noqa: E402
from model import breed_candidates, load_base_model, load_lora_for_inference, prepare_demo  # noqa: E402


def base_sized_blip(template: str):
    """A random BLIP with the base model's shapes (224M parameters) and an offline 30,524-token processor."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    from data import caption_for

    config = BlipConfig(text_config={"num_attention_heads": 12}, vision_config={"initializer_range": 0.02})
    tc = config.text_config
    words = sorted({w for i in range(37) for w in caption_for(i, template).lower().replace(",", " ").replace(".", " ").split()})
    vocab = [f"[unused{i}]" for i in range(tc.vocab_size)]
    for i, token in {tc.pad_token_id: "[PAD]", 100: "[UNK]", 101: "[CLS]", tc.sep_token_id: "[SEP]", 103: "[MASK]",
                     tc.bos_token_id: "[DEC]", 1000: ".", 1001: ","}.items():
        vocab[i] = token
    for i, w in enumerate(words):
        vocab[2000 + i] = w
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]", never_split=["[DEC]"])
    processor = BlipProcessor(BlipImageProcessorPil(), tokenizer)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    return model, copy.deepcopy(model), processor


@torch.no_grad()
def per_image(models, processor, images, max_new_tokens):
    for image in images:
        pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        for model in models:
            model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)


def batched(models, processor, images, template, max_new_tokens, batch_size, rank):
    cfg = PetConfig(max_new_tokens=max_new_tokens, caption_template=template)
    candidates = breed_candidates(processor.tokenizer, template)
    named = dict(zip(("zero_shot", "fine_tuned"), models))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if rank:
            evaluate_batch(named, processor, chunk, candidates, cfg, share_embeddings=True)
        else:  # captions only: what the per-image path does
            from model import captions_from_embeddings, image_embeddings
            p = processor.image_processor(chunk, return_tensors="pt")["pixel_values"]
            embeds = image_embeddings(models[0], p)
            for m in models:
                captions_from_embeddings(m, processor, embeds, max_new_tokens)


def measure(label, models, processor, images, template, max_new_tokens, batch_size):
    row = {"model": label, "images": len(images), "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    for name, fn in (("per_image_generate", lambda: per_image(models, processor, images, max_new_tokens)),
                     ("batched_captions", lambda: batched(models, processor, images, template, max_new_tokens, batch_size, False)),
                     ("batched_captions_and_ranking", lambda: batched(models, processor, images, template, max_new_tokens, batch_size, True))):
        start = time.perf_counter()
        fn()
        row[name] = round(len(images) / (time.perf_counter() - start), 3)  # images per second, both models
        print(label, name, row[name], "images/s", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images for the base-sized model")
    parser.add_argument("--demo_images", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=30, help="base-sized model (the default of evaluate.py)")
    parser.add_argument("--skip_base", action="store_true")
    parser.add_argument("--output", default="bench.json")
    a = parser.parse_args()
    torch.set_grad_enabled(False)
    template = PetConfig().caption_template
    model_dir, data_dir = prepare_demo(DEMO_DIR, template)
    records = load_splits(data_dir)["test"]
    rows = []
    tuned, processor = load_lora_for_inference(os.path.join(DEMO_DIR, "blip-lora"))
    zero = load_base_model(model_dir).eval()
    images = [load_image(r) for r in records[:a.demo_images]]
    per_image([zero, tuned], processor, images[:2], 16)  # warm-up
    rows.append(measure("demo (tiny BLIP, 64 px)", [zero, tuned], processor, images, template, 16, a.batch_size))
    if not a.skip_base:
        zero, tuned, processor = base_sized_blip(template)
        images = [load_image(r).resize((384, 384)) for r in records[:a.images]]
        per_image([zero], processor, images[:1], 2)  # warm-up
        rows.append(measure("base-sized random BLIP (224M, 384 px)", [zero, tuned], processor, images, template,
                            a.max_new_tokens, a.batch_size))
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    with open(a.output, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
