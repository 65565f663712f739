"""Where a training step and an evaluation batch spend their time (torch.profiler), and the greedy
decode loop against transformers' generate, on the project's current path. For gpu_recipe.sh.

    python benchmarks/profile_gpu.py MODEL_DIR [--batch 16] [--eval_batch 64]

Prints: median step times (host-synchronised: eager, frozen weights cast, train.py's --cuda_graphs,
compiled two ways), the top operators by device and by host time, the number of kernel launches
per step, greedy captions by generate, by the own loop without and with a CUDA graph on the same
embeddings (ratios taken in one run; the ids must be identical), and the 37-breed ranking alone.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import inference  # noqa: E402
from data import CaptionCollator  # noqa: E402
from inference import generate_ids, greedy_caption_ids, label_candidates
from labels import NUM_BREEDS, OXFORD_PETS, PETS_TEMPLATE
from model import cast_frozen_linears, create_lora_model, load_base_model, load_processor
from run_io import setup_logging


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(prof, device, title, rows=22):
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"\n=== {title}: kernel launches {launches}")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":
        print(f"--- {title}: by host time")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--compile",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=None,
        help="also time the step compiled, reduce-overhead and the cudagraphs backend (default: on a GPU)",
    )
    a = p.parse_args()
    setup_logging()  # the self-checks' lines
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    template = PETS_TEMPLATE
    processor = load_processor(a.model_dir)
    torch.manual_seed(0)
    model = create_lora_model(load_base_model(a.model_dir)).to(device)
    vc = model.config.vision_config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    embeds = torch.randn(a.batch, tokens, vc.hidden_size, device=device).half()  # as the cache stores them
    batch = CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)(
        [{"caption": OXFORD_PETS.caption(i % NUM_BREEDS, template)} for i in range(a.batch)]
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(image_embeds=embeds, **batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t_step = timed(step, device, a.repeats)
    print(
        f"training step (batch {a.batch}, forward+backward+clip+AdamW, {dtype}): {t_step * 1e3:.1f} ms "
        f"= {a.batch / t_step:.0f} img/s"
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    table(prof, device, f"one training step, batch {a.batch}")

    # The step as train.py now runs it: frozen weights stored in bf16 (no per-step casts), eager;
    # then as CUDA graphs: recorded (--cuda_graphs), compiled two ways; first calls = recording/compiling
    if dtype != torch.float32:
        cast_frozen_linears(model, dtype)
    for _ in range(2):
        step()
    t_cast = timed(step, device, a.repeats)
    print(
        f"training step, frozen weights in {dtype}: {t_cast * 1e3:.1f} ms = {a.batch / t_cast:.0f} img/s "
        f"({t_step / t_cast:.2f}x)"
    )

    def measure(label, run, first_calls, what) -> bool:
        """Times `run`, its first calls apart (recording or compiling); prints it, or why it failed."""
        try:
            sync(device)
            start = time.perf_counter()
            for _ in range(first_calls):
                run()
            sync(device)
            first = time.perf_counter() - start
            t = timed(run, device, a.repeats)
            print(
                f"training step, {label}: {t * 1e3:.1f} ms = {a.batch / t:.0f} img/s ({t_step / t:.2f}x the first "
                f"step above); first {first_calls} step(s) incl. {what} {first:.1f} s"
            )
            return True
        except Exception as e:  # report it and go on: the evaluation measurements below still count
            print(f"training step, {label}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return False

    if device.type == "cuda":  # train.py --cuda_graphs: forward and backward recorded, no compilation
        from trainer import GraphedLoss

        graphed = GraphedLoss(model.get_base_model(), dtype)

        def graphed_step():
            loss = graphed({"image_embeds": embeds, **batch})
            if loss is None:
                raise RuntimeError("recording or its self-check failed (see the warning above)")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if measure("--cuda_graphs", graphed_step, 1, "recording and self-check"):
            with profile(activities=acts) as prof:
                graphed_step()
                sync(device)
            table(prof, device, f"one training step with --cuda_graphs, batch {a.batch}", rows=10)
    if a.compile if a.compile is not None else device.type == "cuda":
        # inductor with CUDA graphs (Triton kernels: long to compile), and the "cudagraphs" backend
        # (AOTAutograd's graphs replayed as recorded, eager kernels: no kernel compilation)
        for label, options in (
            ("reduce-overhead", {"mode": "reduce-overhead"}),
            ("cudagraphs backend", {"backend": "cudagraphs"}),
        ):
            eager_model, model = model, torch.compile(model, **options)
            measure(f"compiled ({label})", step, 3, "compiling")  # compiles forward and backward, records the graphs
            model = eager_model
            torch._dynamo.reset()

    # Evaluation: one batch of cached-like embeddings through greedy captions and the 37-breed ranking
    merged = model.merge_and_unload().to(dtype).eval()
    emb = torch.randn(a.eval_batch, tokens, vc.hidden_size, device=device, dtype=dtype)
    candidates = label_candidates(merged, processor.tokenizer, OXFORD_PETS, template)
    from inference import rank_labels

    @torch.no_grad()
    def eval_batch():
        greedy_caption_ids(merged, emb, 30)
        rank_labels(merged, emb, candidates)

    eval_batch()
    t_eval = timed(eval_batch, device, max(2, a.repeats // 3))
    print(
        f"\nevaluation batch ({a.eval_batch} images, one model: greedy captions + 37-breed ranking): "
        f"{t_eval * 1e3:.1f} ms = {a.eval_batch / t_eval:.0f} img/s per model"
    )
    with profile(activities=acts) as prof:
        eval_batch()
        sync(device)
    table(prof, device, f"one evaluation batch of {a.eval_batch}, one model")

    # The greedy loop (with and without a CUDA graph) against generate, same embeddings: a random
    # model never writes [SEP], so all run the whole 30 steps (the worst case for each)
    paths = {
        "generate": lambda: generate_ids(merged, emb, 30, 1),
        "own loop, plain": lambda: greedy_caption_ids(merged, emb, 30, cuda_graph=False),
        "own loop, default (CUDA graph on a GPU)": lambda: greedy_caption_ids(merged, emb, 30),
    }
    with torch.no_grad():
        ids = {name: fn() for name, fn in paths.items()}
        times = {name: [] for name in paths}
        for _ in range(3):  # interleaved: a busy host slows all alike
            for name, fn in paths.items():
                times[name].append(timed(fn, device, 1))
        ranking = timed(lambda: rank_labels(merged, emb, candidates), device, 3)
    median = {name: statistics.median(t) for name, t in times.items()}
    same = all(torch.equal(i, ids["generate"]) for i in ids.values())
    print(
        f"\ngreedy captions, {a.eval_batch} images x {ids['generate'].shape[1] - 1} steps: "
        + ", ".join(f"{name} {t * 1e3:.0f} ms ({median['generate'] / t:.2f}x)" for name, t in median.items())
        + f"; identical ids: {same}; the CUDA-graph decoder's own check: {graph_check_outcome()}"
    )
    print(f"37-breed ranking, {a.eval_batch} images: {ranking * 1e3:.0f} ms = {a.eval_batch / ranking:.0f} img/s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def graph_check_outcome() -> str:
    check = inference.graph_decoding
    return "failed, graphs off (see the warning)" if check.off else "passed" if check.passed else "not run"


if __name__ == "__main__":
    main()
