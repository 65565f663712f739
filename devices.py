"""What depends on the hardware: the device and dtype a run uses, and one table of device-dependent defaults."""

import torch

# Everything that depends on the device, per device type. They change speed and memory, never results.
# - Options' defaults, per options class (parse_config applies them; a flag the user typed wins). On a
#   GPU decoding a caption is launch-bound (a step costs about the same for 32 images or 512): fewer,
#   bigger batches for validation, the embedding cache and evaluation.
# - ranking_rows: candidate captions per decoder pass of the breed ranking (rank_breeds); on a GPU 32
#   images of 37 candidates (about 6 GB of logits for the base model), on a CPU a cache-sized pass.
# - explain_batch: images per decoder pass in explainability.py (their cross-attention maps are held at once).
# - preload_rows: embedding-cache rows per copy when a training set is preloaded (CachedEmbeddingDataset).
# - graph_check_every: decoding steps between host checks for "every caption has ended" when the step is
#   replayed as a CUDA graph (each check waits for the device).
# - max_image_workers: processes that decode and preprocess images (at most the cores but one).
_COMMON = dict(explain_batch=16, preload_rows=256, max_image_workers=8)
DEVICE_DEFAULTS = {
    "cpu": dict(_COMMON, ranking_rows=128, graph_check_every=1),
    "mps": dict(_COMMON, ranking_rows=128, graph_check_every=1),
    "cuda": dict(
        _COMMON,
        ranking_rows=37 * 32,
        graph_check_every=4,
        TrainConfig=dict(per_device_eval_batch_size=128),
        EvalConfig=dict(per_device_eval_batch_size=256),
    ),
}


def device_defaults(options_class: type, device: torch.device) -> dict:
    """The defaults of `options_class`'s options on this device ({} when none differ)."""
    return DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"]).get(options_class.__name__, {})


def device_setting(name: str, device) -> int:
    """One of the table's sizes (ranking_rows, explain_batch, ...) for a torch.device or device type."""
    kind = getattr(device, "type", device)
    return DEVICE_DEFAULTS.get(kind, DEVICE_DEFAULTS["cpu"])[name]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision != "auto":
        if precision not in choices:  # the command line offers only these (PetConfig.precision)
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
        return choices[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def rng_fork_args(device: torch.device) -> dict:
    """torch.random.fork_rng's arguments for the CPU's and `device`'s random state."""
    if device.type != "cuda":
        return {"devices": []}  # the CPU's state is always forked
    return {
        "devices": [device.index if device.index is not None else torch.cuda.current_device()],
        "device_type": "cuda",
    }


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The autocast context of a bf16 or fp16 run (a no-op in fp32)."""
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half)
