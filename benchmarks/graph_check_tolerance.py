"""How far two correct computations of the first LoRA training step lie apart: the ground for
train.GraphedLoss.TOLERANCE (the --cuda_graphs self-check's bound).

    python benchmarks/graph_check_tolerance.py [--out FILE.json]

Base-sized random BLIP decoder (frozen weights nudged off their initial values), LoRA r=32 on
query,value at initialisation (B = 0, as at step 1), batch 8 of cached-like embeddings. Prints the
relative difference (vector norms, train.relative_difference) of the loss and of all LoRA gradients:
- the batch reordered (same math, other reduction order), fp32 and bf16 autocast;
- bf16 autocast against fp32 (every rounding at bf16's size: the most rounding can do);
- one LoRA dropout mask (p=0.05) against another (an error the check must catch).
"""

import argparse
import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import CaptionCollator  # noqa: E402
from demo import build_tiny_blip  # noqa: E402
from labels import NUM_BREEDS, OXFORD_PETS, PETS_TEMPLATE
from model import cast_frozen_linears, create_lora_model, load_base_model, load_processor  # noqa: E402
from trainer import relative_difference  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out")
    a = p.parse_args()
    template = PETS_TEMPLATE
    words = (
        " ".join(OXFORD_PETS.caption(i, template) for i in range(NUM_BREEDS))
        .replace(",", " ")
        .replace(".", " ")
        .split()
    )
    folder = build_tiny_blip(tempfile.mkdtemp(), words + ["cat", "dog"], base_sized=True)
    base, processor = load_base_model(folder), load_processor(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in base.parameters():
            q.add_(0.01 * torch.randn(q.shape, generator=generator))
    batch = CaptionCollator(processor.tokenizer, base.config.text_config.bos_token_id, 24)(
        [{"caption": OXFORD_PETS.caption(i * 5 % NUM_BREEDS, template)} for i in range(a.batch)]
    )
    batch["image_embeds"] = torch.randn(a.batch, 577, 768, generator=generator).half()  # as the cache stores them
    order = torch.randperm(a.batch, generator=generator)

    def step(model, dtype, reorder=False, seed=0):
        inputs = {k: v[order] for k, v in batch.items()} if reorder else batch
        params = [q for q in model.parameters() if q.requires_grad]
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model.train()(**inputs).loss
        grads = torch.autograd.grad(loss, params)
        return loss.float(), torch.cat([g.float().flatten() for g in grads])

    def diff(x, y):
        return {"loss": relative_difference(x[0], y[0]), "lora_gradients": relative_difference(x[1], y[1])}

    def lora(dropout):
        """The LoRA model in fp32 and a copy (the same LoRA initialisation) with its frozen weights in bf16, as
        train.py stores them."""
        model = create_lora_model(copy.deepcopy(base), 32, 64, dropout, "query,value")
        half = copy.deepcopy(model)
        cast_frozen_linears(half, torch.bfloat16)
        return model, half

    (fp32, bf16), (dropped32, dropped16) = lora(0.0), lora(0.05)
    reference32, reference16 = step(fp32, torch.float32), step(bf16, torch.bfloat16)
    record = {
        "batch": a.batch,
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "reordered_fp32": diff(step(fp32, torch.float32, reorder=True), reference32),
        "reordered_bf16": diff(step(bf16, torch.bfloat16, reorder=True), reference16),
        "bf16_vs_fp32": diff(reference16, reference32),
        "other_dropout_mask_fp32": diff(step(dropped32, torch.float32, seed=1), step(dropped32, torch.float32)),
        "other_dropout_mask_bf16": diff(step(dropped16, torch.bfloat16, seed=1), step(dropped16, torch.bfloat16)),
    }
    for name, value in record.items():
        print(f"{name}: {value}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
