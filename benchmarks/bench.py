"""Benchmark: each fast path against its baseline, as ratios measured in one run.

    python benchmarks/bench.py                       # CPU: base-sized random BLIP and the tiny demo model
    python benchmarks/bench.py --models tiny         # seconds instead of minutes
    python benchmarks/bench.py --device cuda --dtype bf16
    python benchmarks/bench.py --models base,deep --sections cast   # frozen weights cast once: op counts, host time
    python benchmarks/bench.py --models tiny,deep --sections decode # greedy captions: generate vs the own loop

Every figure is the median over --repeats runs, with the baseline and the fast path
interleaved in the same process (these machines are noisy; ratios taken together are not).
Writes bench.json (--out) and prints a table.
"""

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import PetConfig  # noqa: E402
from data import CaptionCollator, CaptionDataset, load_image, load_splits
from demo import DEMO_BASE_RECIPE, build_tiny_blip, write_synthetic_pets  # noqa: E402
from embedding_cache import CachedEmbeddingDataset, EmbeddingCache, vision_fingerprint
from inference import image_embeddings
from labels import NUM_BREEDS, OXFORD_PETS, PETS_TEMPLATE
from model import cast_frozen_linears, create_lora_model, load_base_model, load_processor

TEMPLATE = PETS_TEMPLATE


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device) -> dict:
    """Median seconds per call of each fn, calling them in turn `repeats` times after one warm-up each."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build_model(kind: str, workdir: str) -> str:
    """base: blip-image-captioning-base's shapes, random; tiny: the demo's; deep: tiny width at the base's
    depth (12 text layers, so the 48 query/value LoRA modules and the op count of base): host overhead."""
    path = os.path.join(workdir, f"{kind}-blip")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny_blip(path, base_sized=(kind == "base"), hidden=DEMO_BASE_RECIPE["hidden"])
        if kind == "deep":
            from transformers import BlipConfig, BlipForConditionalGeneration

            config = BlipConfig.from_pretrained(path)
            config.text_config.num_hidden_layers = BlipConfig().text_config.num_hidden_layers
            torch.manual_seed(0)
            BlipForConditionalGeneration(config).save_pretrained(path)
    return path


def pets(workdir) -> str:
    data_dir = os.path.join(workdir, "pets")
    if not os.path.isdir(data_dir):
        write_synthetic_pets(data_dir, breeds=range(8), trainval_per_breed=8, test_per_breed=4, size=96)
    return data_dir


def setup(kind, workdir, device, n_images, lora_targets):
    model_dir = build_model(kind, workdir)
    data_dir = pets(workdir)
    processor = load_processor(model_dir)
    model = create_lora_model(load_base_model(model_dir), target_modules=lora_targets).to(device)
    records = load_splits(data_dir, 0.0)["train"][:n_images]
    return model, processor, records


def training(kind, workdir, device, dtype, batch, repeats, lora_targets):
    """1. A LoRA training step from pixels (stock) against one from cached image embeddings."""
    model, processor, records = setup(kind, workdir, device, batch, lora_targets)
    collate = CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)
    cache = EmbeddingCache(os.path.join(workdir, "cache"), vision_fingerprint(model, processor), "float16")
    cache.build(records, lambda px: image_embeddings(model, px.to(device)), processor.image_processor)
    stock = collate(
        [CaptionDataset(records, processor.image_processor, OXFORD_PETS, TEMPLATE)[i] for i in range(batch)]
    )
    cached = collate([CachedEmbeddingDataset(records, cache, OXFORD_PETS, TEMPLATE)[i] for i in range(batch)])
    stock = {k: v.to(device) for k, v in stock.items()}
    cached = {k: v.to(device) for k, v in cached.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step(batch_):
        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(**batch_).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    t = interleaved({"stock": step(stock), "cached": step(cached)}, repeats, device)
    return {
        "batch": batch,
        "stock_img_s": batch / t["stock"],
        "cached_img_s": batch / t["cached"],
        "speedup": t["stock"] / t["cached"],
    }


def training_memory(kind, workdir, device, dtype, batch, mode, lora_targets):
    """Peak memory of a few training steps in `mode` (stock|cached), measured in this process alone."""
    model, processor, records = setup(kind, workdir, device, batch, lora_targets)
    collate = CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)
    if mode == "cached":
        cache = EmbeddingCache(os.path.join(workdir, "cache"), vision_fingerprint(model, processor), "float16")
        cache.build(records, lambda px: image_embeddings(model, px.to(device)), processor.image_processor)
        items = [CachedEmbeddingDataset(records, cache, OXFORD_PETS, TEMPLATE)[i] for i in range(batch)]
    else:
        items = [CaptionDataset(records, processor.image_processor, OXFORD_PETS, TEMPLATE)[i] for i in range(batch)]
    b = {k: v.to(device) for k, v in collate(items).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train()
    for _ in range(2):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**b).loss
        loss.backward()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # growth of peak RSS, MiB


def pipeline(kind, workdir, device, dtype, batch, steps, repeats, lora_targets):
    """2. The Trainer loop (dataset, collation, Trainer) against bare forward+backward+step on batches in memory."""
    from transformers import Trainer, TrainerCallback

    from config import TrainConfig

    model, processor, records = setup(kind, workdir, device, batch * 2, lora_targets)
    cache = EmbeddingCache(os.path.join(workdir, "cache"), vision_fingerprint(model, processor), "float16")
    cache.build(records, lambda px: image_embeddings(model, px.to(device)), processor.image_processor)
    dataset = CachedEmbeddingDataset(records, cache, OXFORD_PETS, TEMPLATE)
    collate = CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:  # skip the first step (warm-up, optimizer state)
                sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            sync(device)
            self.seconds = time.perf_counter() - self.t0

    args = TrainConfig(
        output_dir=os.path.join(workdir, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=10**6,
        learning_rate=1e-5,
        disable_tqdm=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=device.type == "cuda",
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = [
        {k: v.to(device) for k, v in collate([dataset[i] for i in range(s * batch, (s + 1) * batch)]).items()}
        for s in range(len(dataset) // batch)
    ]

    def trainer_loop():
        timer = StepTimer()
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[timer]).train()
        trainer_loop.per_step.append(timer.seconds / (steps - 1))

    trainer_loop.per_step = []

    def bare_loop():
        model.train()
        for s in range(steps - 1):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(**batches[s % len(batches)]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t = interleaved({"trainer": trainer_loop, "bare": bare_loop}, repeats, device)
    trainer_step = statistics.median(trainer_loop.per_step[1:])  # the first call was the warm-up
    bare_step = t["bare"] / (steps - 1)
    return {
        "batch": batch,
        "trainer_img_s": batch / trainer_step,
        "bare_img_s": batch / bare_step,
        "ratio": bare_step / trainer_step,
    }


def vision(kind, workdir, device, dtype, batch, repeats):
    """4. The vision encoder's forward with BLIP's eager attention against the fused SDPA kernel."""
    from model import set_vision_attention

    model = load_base_model(build_model(kind, workdir), dtype=dtype).to(device).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def encode(implementation):
        @torch.no_grad()
        def run():
            set_vision_attention(model, implementation)
            return image_embeddings(model, pixels)

        return run

    diff = (encode("eager")().float() - encode("sdpa")().float()).abs().max().item()
    t = interleaved({"eager": encode("eager"), "sdpa": encode("sdpa")}, repeats, device)
    return {
        "batch": batch,
        "eager_img_s": batch / t["eager"],
        "sdpa_img_s": batch / t["sdpa"],
        "speedup": t["eager"] / t["sdpa"],
        "max_abs_diff": diff,
    }


def evaluation(kind, workdir, device, dtype, n_images, repeats, max_new_tokens=12):
    """3. Everything evaluate.py needs per image, the naive way against the project's path; same predictions."""
    from inference import evaluate_batch, label_candidates

    model_dir = build_model(kind, workdir)
    processor = load_processor(model_dir)
    base = load_base_model(model_dir, dtype=dtype).to(device).eval()
    tuned = create_lora_model(load_base_model(model_dir, dtype=dtype), target_modules="query,value").to(device).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: LoRA's B starts at zero, which would change nothing
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    merged = create_lora_model(load_base_model(model_dir, dtype=dtype), target_modules="query,value")
    merged.load_state_dict(tuned.state_dict())
    merged = merged.merge_and_unload().to(device).eval()
    records = load_splits(pets(workdir), 0.0)["test"][:n_images]
    images = [load_image(r) for r in records]
    captions = [OXFORD_PETS.caption(b, TEMPLATE) for b in range(NUM_BREEDS)]
    tok = processor.tokenizer

    @torch.no_grad()
    def naive():
        """One image at a time; each model, and each of the 37 candidate captions, runs the full model from pixels."""
        preds = []
        for image in images:
            pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"].to(device, dtype)
            for model in (base, tuned):
                ids = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
                caption = tok.decode(ids[0], skip_special_tokens=True).strip()
                scores = []
                for text in captions:
                    enc = tok(text, return_tensors="pt").to(device)
                    input_ids = enc["input_ids"].clone()
                    input_ids[:, 0] = model.config.text_config.bos_token_id
                    logits = model(
                        pixel_values=pixels, input_ids=input_ids, attention_mask=enc["attention_mask"]
                    ).logits
                    logp = logits[0, :-1].float().log_softmax(-1).gather(-1, input_ids[0, 1:, None]).sum()
                    scores.append(logp.item())
                preds.append((caption, int(torch.tensor(scores).argmax())))
        return preds

    cfg = PetConfig(max_new_tokens=max_new_tokens)
    candidates = label_candidates(base, tok, OXFORD_PETS, TEMPLATE)

    @torch.no_grad()
    def project():
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        out = evaluate_batch({"zero_shot": base, "fine_tuned": merged}, processor, pixels, candidates, cfg, True)
        return [
            (out[m]["captions"][i], int(out[m]["scores"][i].argmax()))
            for i in range(len(images))
            for m in ("zero_shot", "fine_tuned")
        ]

    slow, fast = naive(), project()
    t = interleaved({"naive": naive, "project": project}, repeats, device)
    return {
        "images": n_images,
        "naive_img_s": n_images / t["naive"],
        "fast_img_s": n_images / t["project"],
        "speedup": t["naive"] / t["project"],
        "same_captions": [c for c, _ in slow] == [c for c, _ in fast],
        "same_top1_breed": [b for _, b in slow] == [b for _, b in fast],
        "differing_captions": sum(a[0] != b[0] for a, b in zip(slow, fast)),
        "differing_top1": sum(a[1] != b[1] for a, b in zip(slow, fast)),
        "predictions": len(slow),
    }


def op_counts(fn, device) -> dict:
    """Operator calls in one call of fn (torch.profiler): all aten ops, the two cast ops, and GPU kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ) as prof:
        fn()
        sync(device)
    events = prof.key_averages()

    def count(*keys):
        return sum(e.count for e in events if e.key in keys)

    return {
        "aten_ops": sum(e.count for e in events if e.key.startswith("aten::")),
        "copy_": count("aten::copy_"),
        "_to_copy": count("aten::_to_copy"),
        "kernel_launches": count("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"),
    }


def frozen_cast(kind, workdir, device, dtype, batch, repeats, lora_targets):
    """5. A training step under autocast with the frozen weights in fp32 (autocast casts them at every step)
    against the same with them stored in autocast's dtype once (model.cast_frozen_linears, as train.py does)."""
    model_dir = build_model(kind, workdir)
    processor = load_processor(model_dir)
    torch.manual_seed(0)
    fp32 = create_lora_model(load_base_model(model_dir), target_modules=lora_targets)
    cast = copy.deepcopy(fp32)  # the same LoRA initialisation
    tensors = cast_frozen_linears(cast, dtype)
    vision = fp32.config.vision_config
    shape = (batch, (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)
    inputs = CaptionCollator(processor.tokenizer, fp32.config.text_config.bos_token_id)(
        [{"caption": OXFORD_PETS.caption(i % NUM_BREEDS, TEMPLATE)} for i in range(batch)]
    )
    inputs["image_embeds"] = torch.randn(shape, generator=torch.Generator().manual_seed(0)).half()  # as cached
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def step(model):
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # Trainer's default optimizer (adamw_torch_fused)

        def run():  # as Trainer's step: forward, backward, clip, AdamW
            torch.manual_seed(len(run.losses))  # the same LoRA dropout masks at the same step of either model
            with torch.autocast(device.type, dtype=dtype):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.losses.append(loss.detach())

        run.losses = []
        return run

    steps = {"fp32_frozen": step(fp32), "cast": step(cast)}
    for run in steps.values():
        run()  # warm-up (optimizer state), outside the profile
    r = {
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "cast_tensors": tensors,
        "ops": {name: op_counts(run, device) for name, run in steps.items()},
    }
    if kind == "base" and device.type == "cpu":
        r["note"] = "not timed: on a CPU the base-sized step is compute-bound (~18 s at batch 16 in bf16 on 2 cores)"
    else:
        # One thread on a CPU: the narrow model's ops gain nothing from a second, and while another process
        # holds a core, OpenMP's per-op barriers cost milliseconds each (6 s a step instead of 0.08 s, measured)
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if device.type == "cpu" else threads)
        try:
            t = interleaved(steps, repeats, device)
        finally:
            torch.set_num_threads(threads)
        r.update(
            fp32_frozen_ms=t["fp32_frozen"] * 1e3,
            cast_ms=t["cast"] * 1e3,
            speedup=t["fp32_frozen"] / t["cast"],
            timed_threads=1 if device.type == "cpu" else threads,
        )
    # every step of the two took the same optimizer steps from the same start: bitwise the same losses
    r["same_losses"] = all(torch.equal(a, b) for a, b in zip(steps["fp32_frozen"].losses, steps["cast"].losses))
    return r


def decoding(kind, workdir, device, dtype, n_images, repeats, steps=30):
    """6. Greedy captions: transformers' generate against the project's loop (plain calls, and on a GPU
    its CUDA graph), on the same random embeddings; a model that never writes [SEP] runs all steps."""
    from inference import generate_ids, greedy_caption_ids

    model = load_base_model(build_model(kind, workdir), dtype=dtype).to(device).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] = -1e4
    vision = model.config.vision_config
    shape = (n_images, (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)
    embeds = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    paths = {
        "generate": lambda: generate_ids(model, embeds, steps, 1),
        "loop": lambda: greedy_caption_ids(model, embeds, steps, cuda_graph=False),
    }
    if device.type == "cuda":
        paths["graph"] = lambda: greedy_caption_ids(model, embeds, steps, cuda_graph=True)
    with torch.no_grad():
        ids = {name: fn() for name, fn in paths.items()}
        t = interleaved(paths, repeats, device)
        ops = {name: op_counts(fn, device) for name, fn in paths.items()}
    r = {
        "images": n_images,
        "steps": steps,
        "identical_ids": all(torch.equal(i, ids["generate"]) for i in ids.values()),
    }
    for name in paths:
        r[f"{name}_ms"] = t[name] * 1e3
        r[f"{name}_aten_ops"] = ops[name]["aten_ops"]
        r[f"{name}_kernel_launches"] = ops[name]["kernel_launches"]
        r[f"{name}_speedup"] = t["generate"] / t[name]
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        default="base,tiny",
        help="comma-separated: base (224M, random), tiny (demo), deep (tiny width, base depth)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4 on CPU for base, 32 on GPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora_target_modules", default="query,value")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "petcaption-bench"))
    p.add_argument("--out", default="bench.json")
    p.add_argument("--sections", default="training,pipeline,evaluation,vision,cast,decode")
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)  # internal: one memory probe per process
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    os.makedirs(a.workdir, exist_ok=True)
    torch.manual_seed(0)

    if a._memory:
        kind, mode, batch = a._memory.split(":")
        print(
            json.dumps(
                training_memory(
                    kind, os.path.join(a.workdir, kind), device, dtype, int(batch), mode, a.lora_target_modules
                )
            )
        )
        return

    results = {
        "machine": {
            "device": torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": a.dtype,
            "repeats": a.repeats,
        }
    }
    for kind in a.models.split(","):
        workdir = os.path.join(a.workdir, kind)
        os.makedirs(workdir, exist_ok=True)
        batch = a.batch or (32 if device.type == "cuda" else 4 if kind == "base" else 32)
        sections, r = a.sections.split(","), {}
        if "training" in sections:
            print(f"[{kind}] training step, stock vs cached embeddings (batch {batch}) ...", flush=True)
            r["training"] = training(kind, workdir, device, dtype, batch, a.repeats, a.lora_target_modules)
            for mode in ("stock", "cached"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--device",
                        a.device,
                        "--dtype",
                        a.dtype,
                        "--workdir",
                        a.workdir,
                        "--lora_target_modules",
                        a.lora_target_modules,
                        "--_memory",
                        f"{kind}:{mode}:{batch}",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r["training"][f"{mode}_peak_mib"] = json.loads(out.stdout.strip().splitlines()[-1])
        if "pipeline" in sections:
            print(f"[{kind}] training loop vs bare forward+backward ...", flush=True)
            r["pipeline"] = pipeline(
                kind, workdir, device, dtype, batch, 6, max(3, a.repeats // 2), a.lora_target_modules
            )
        if "evaluation" in sections:
            n_eval = 2 if kind == "base" and device.type == "cpu" else 8
            print(f"[{kind}] evaluation, naive vs project path ({n_eval} images) ...", flush=True)
            r["evaluation"] = evaluation(kind, workdir, device, dtype, n_eval, max(1, a.repeats // 2))
        if "vision" in sections:
            print(f"[{kind}] vision encoder, eager vs SDPA attention (batch {batch}) ...", flush=True)
            r["vision"] = vision(kind, workdir, device, dtype, batch, a.repeats)
        if "decode" in sections:
            n_decode = 4 if kind == "base" and device.type == "cpu" else 64 if device.type == "cuda" else 8
            print(f"[{kind}] greedy captions, generate vs own loop ({n_decode} images x 30 steps) ...", flush=True)
            r["decode"] = decoding(kind, workdir, device, dtype, n_decode, a.repeats)
        if "cast" in sections:
            half = (
                dtype if dtype != torch.float32 else torch.bfloat16
            )  # the cast is for autocast: bf16 unless --dtype fp16
            step_batch = a.batch or 16  # the GPU profile's training step (profile_gpu.py, h100-recipe-profile.txt)
            print(
                f"[{kind}] training step under {half} autocast, frozen weights fp32 vs cast once "
                f"(batch {step_batch}) ...",
                flush=True,
            )
            r["cast"] = frozen_cast(kind, workdir, device, half, step_batch, a.repeats, a.lora_target_modules)
        results[kind] = r
        print_table(kind, r)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.out}")


def print_table(kind, r):
    rows = []
    if "training" in r:
        t = r["training"]
        rows.append(
            (
                "training step, img/s",
                f"stock {t['stock_img_s']:.2f}",
                f"cached {t['cached_img_s']:.2f}",
                f"{t['speedup']:.2f}x",
            )
        )
        rows.append(
            (
                "training peak memory, MiB",
                f"stock {t['stock_peak_mib']:.0f}",
                f"cached {t['cached_peak_mib']:.0f}",
                f"{t['cached_peak_mib'] / max(t['stock_peak_mib'], 1e-9):.2f}x",
            )
        )
    if "pipeline" in r:
        p = r["pipeline"]
        rows.append(
            (
                "training loop, img/s",
                f"Trainer {p['trainer_img_s']:.2f}",
                f"bare {p['bare_img_s']:.2f}",
                f"{p['ratio']:.2f} of limit",
            )
        )
    if "evaluation" in r:
        e = r["evaluation"]
        rows.append(
            (
                "evaluation, img/s",
                f"naive {e['naive_img_s']:.3f}",
                f"project {e['fast_img_s']:.3f}",
                f"{e['speedup']:.1f}x, same predictions: {e['same_captions'] and e['same_top1_breed']}",
            )
        )
    if "vision" in r:
        v = r["vision"]
        rows.append(
            (
                "vision encoder, img/s",
                f"eager {v['eager_img_s']:.2f}",
                f"sdpa {v['sdpa_img_s']:.2f}",
                f"{v['speedup']:.2f}x, max diff {v['max_abs_diff']:.1e}",
            )
        )
    if "cast" in r:
        c = r["cast"]
        before, after = c["ops"]["fp32_frozen"], c["ops"]["cast"]
        for key in ("aten_ops", "copy_", "_to_copy") + (("kernel_launches",) if before["kernel_launches"] else ()):
            rows.append(
                (
                    f"{c['dtype']} step {key}",
                    f"fp32 frozen {before[key]}",
                    f"cast {after[key]}",
                    f"{before[key] / max(after[key], 1):.2f}x fewer",
                )
            )
        if "cast_ms" in c:
            rows.append(
                (
                    f"{c['dtype']} step, ms",
                    f"fp32 frozen {c['fp32_frozen_ms']:.1f}",
                    f"cast {c['cast_ms']:.1f}",
                    f"{c['speedup']:.2f}x, same losses: {c['same_losses']}",
                )
            )
        else:
            rows.append((f"{c['dtype']} step", "", "", f"same losses: {c['same_losses']}; not timed"))
    if "decode" in r:
        d = r["decode"]
        for name in [n for n in ("loop", "graph") if f"{n}_ms" in d]:
            rows.append(
                (
                    f"greedy {d['images']}x{d['steps']}, ms",
                    f"generate {d['generate_ms']:.1f}",
                    f"{name} {d[f'{name}_ms']:.1f}",
                    f"{d[f'{name}_speedup']:.2f}x, same ids: {d['identical_ids']}",
                )
            )
        rows.append(("greedy, aten ops", f"generate {d['generate_aten_ops']}", f"loop {d['loop_aten_ops']}", ""))
    print(f"\n== {kind} ==")
    for row in rows:
        print(f"{row[0]:<28}{row[1]:<20}{row[2]:<20}{row[3]}")
    print()


if __name__ == "__main__":
    main()
