"""BLIP + LoRA: load, wrap, reload, caption; image embeddings, likelihood ranking, cross-attention."""

import copy
import hashlib
import json
import logging
import math
import os
from typing import Optional

import torch
from transformers import BertTokenizer, BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip import BlipImageProcessorPil
from transformers.models.blip.modeling_blip import BlipAttention, BlipForConditionalGenerationModelOutput

from config import DEFAULT_DATASET, UserError, finish_interrupted_save, hub_reachable, is_local, offline_hint, same_source
from data import NUM_BREEDS, caption_for, tokenize_captions

logger = logging.getLogger(__name__)
MAX_ERROR_CHARS = 200  # of a library's exception text inside our one-line error: enough to name the problem


def _local_or_cached(name: str, flag: str = "--model_name_or_path") -> dict:
    """from_pretrained kwargs that fail fast offline instead of retrying for ~45 s."""
    if os.path.isdir(name):
        return {}
    if is_local(name):  # path-like but no folder
        raise UserError(f"model folder {name!r} does not exist; pass an existing folder to {flag} or a Hub id")
    return {} if hub_reachable() else {"local_files_only": True}


def load_processor(name_or_path: str) -> BlipProcessor:
    """BlipProcessor with the PIL image processor (torchvision is optional, so don't depend on it)."""
    kwargs = _local_or_cached(name_or_path)
    try:
        image_processor = BlipImageProcessorPil.from_pretrained(name_or_path, **kwargs)
        tokenizer = BertTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from None
        raise UserError(f"no BLIP processor (preprocessor_config.json, tokenizer files) found at {name_or_path!r}") from None
    except Exception as e:  # garbled tokenizer.json / JSON configs: tokenizers and json raise their own types
        raise UserError(f"the processor files at {name_or_path!r} are corrupt ({type(e).__name__}: {str(e)[:150]}); "
                        "restore them from the original model") from None
    add_decoder_tokens(tokenizer)
    return BlipProcessor(image_processor, tokenizer)


def add_decoder_tokens(tokenizer) -> None:
    """Teach a plain BERT tokenizer BLIP's [DEC] (bos) and [ENC] tokens, as original BLIP does in code.

    The checkpoint's tokenizer files have neither (30,522 entries, no bos); its model has 30,524
    text embeddings and starts every caption from id 30522 (text_config.bos_token_id). Added in
    this order they get ids 30522 and 30523, so decoding, special-token skipping and word maps
    know the start token. check_fits() then confirms the id against the model config.
    """
    if tokenizer.bos_token_id is None:  # a tokenizer saved by this project already has both
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})


class BlipForPetCaptioning(BlipForConditionalGeneration):
    """BlipForConditionalGeneration with the three changes this project needs, nothing else.

    1. `accepts_loss_kwargs = False`. BLIP's forward takes **kwargs, so Trainer believes the
       model normalises the loss by num_items_in_batch itself and skips dividing it by
       gradient_accumulation_steps: the loss and the gradients would grow with accumulation.
    2. `forward(image_embeds=...)` as an alternative to pixel_values: the frozen vision encoder's
       output, cached once per image, so a training step runs only the decoder (the encoder is
       ~85% of BLIP's compute). It goes through forward, not around it, so PEFT, Trainer and DDP
       see an ordinary call.
    3. The vision encoder's self-attention runs through torch's fused SDPA kernel
       (BlipVisionSdpaAttention): same outputs, a faster encoder.
    The weights and config are the stock checkpoint's; from_pretrained loads them unchanged.
    """

    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        set_vision_attention(self, "sdpa")

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None, image_embeds=None, **kwargs):
        if image_embeds is None:
            return super().forward(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        image_embeds = image_embeds.to(self.text_decoder.dtype)  # the cache stores half precision
        out = self.text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                labels=labels, reduction="mean", **kwargs)
        return BlipForConditionalGenerationModelOutput(loss=out.loss, logits=out.logits, image_embeds=image_embeds)


class BlipVisionSdpaAttention(BlipAttention):
    """BLIP's vision self-attention through torch.nn.functional.scaled_dot_product_attention.

    transformers has no SDPA path for BLIP. Same weights and, in fp32, the same outputs as eager
    (max difference ~4e-6 on the base-sized encoder); the encoder runs 1.2-1.4x faster on a
    2-core CPU (benchmarks/bench.py, "vision encoder" row). Asked for attention weights
    (output_attentions=True) it falls back to the eager computation, which returns them.
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if kwargs.get("output_attentions"):
            return super().forward(hidden_states, **kwargs)
        bsz, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(bsz, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = torch.nn.functional.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
        return self.projection(context.transpose(1, 2).reshape(bsz, length, dim)), None


def set_vision_attention(model, implementation: str = "sdpa"):
    """Switch every BLIP vision self-attention in `model` between "sdpa" and "eager" (same weights)."""
    cls = {"sdpa": BlipVisionSdpaAttention, "eager": BlipAttention}[implementation]
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.__class__ = cls
    return model


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> BlipForPetCaptioning:
    kwargs = _local_or_cached(name_or_path)
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
            # transformers would load the adapter's own base and apply the adapter: the "zero-shot" model
            # would be the fine-tuned one, silently
            raise UserError(f"{name_or_path!r} holds a LoRA adapter, not a base model; pass it as --adapter and leave "
                            "out --model_name_or_path (the adapter names its base) or pass the base model's folder")
        # The saved adapter records this as its base: absolute, so it loads from any working directory
        name_or_path = os.path.abspath(name_or_path)
    try:
        model, info = BlipForPetCaptioning.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True, **kwargs)
    except OSError:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from None
        raise UserError(f"no BLIP captioning model (config.json and model.safetensors or pytorch_model.bin) found at "
                        f"{name_or_path!r}; pass a model folder or Hub id to --model_name_or_path") from None
    except Exception as e:  # a truncated or corrupt weights file: safetensors and torch raise their own types
        raise UserError(f"cannot load the model at {name_or_path!r} ({type(e).__name__}: {str(e)[:150]}); "
                        "the weights may be corrupt or truncated: download them again") from None
    # transformers fills missing weights with random ones and only logs it: a model that is partly random is no base
    # (position_ids are buffers the model rebuilds; the Hub's 4.26-era .bin stores them, newer files do not)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.endswith("position_ids"))
    if missing:
        raise UserError(f"the model at {name_or_path!r} lacks {len(missing)} weights (first: {', '.join(missing[:3])}); "
                        "it is incomplete: download it again")
    check_finite_model(model, f"the model at {name_or_path!r}", "it is damaged: download it again")
    return model


@torch.no_grad()
def check_finite_model(model, what: str, fix: str) -> None:
    """UserError unless every weight of `model` and its output on a probe input are finite numbers.

    Both, because each misses what the other finds: a NaN in an embedding row the probe never
    looks up, and finite weights whose product overflows (an adapter scaled by lora_alpha 1e30,
    a model run in fp16). Whatever `model` is (base, PEFT-wrapped, merged), the probe is a blank
    image and the caption start, in the model's own dtype and device: what inference computes.
    """
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what} has NaN or infinite weights (first: {name}); {fix}")
    param = next(model.parameters())
    config = model.config
    side = config.vision_config.image_size
    pixels = torch.zeros(1, 3, side, side, dtype=param.dtype, device=param.device)
    ids = torch.tensor([[config.text_config.bos_token_id, config.text_config.sep_token_id]], device=param.device)
    logits = model(pixel_values=pixels, input_ids=ids).logits
    if not torch.isfinite(logits).all():
        half = " (or run it with --precision fp32)" if param.dtype in (torch.float16, torch.bfloat16) else ""
        raise UserError(f"{what} computes NaN or infinite outputs in {str(param.dtype).replace('torch.', '')}; {fix}{half}")


def create_lora_model(model, r: int = 32, alpha: int = 64, dropout: float = 0.05, target_modules="query,value"):
    """Wrap `model` with LoRA adapters; task_type stays unset (CAUSAL_LM breaks BLIP's forward)."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if isinstance(target_modules, str) else list(target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(f"--lora_target_modules {','.join(unknown)} match no module of this model; e.g. query,value,key,dense")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def cast_frozen_linears(model, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of `model`'s nn.Linear layers in `dtype`, autocast's; returns how many tensors.

    Under autocast every Linear casts its fp32 weight and bias to bf16/fp16 on each call, and
    autocast keeps the cast only for leaf tensors that require grad: the frozen base weights are
    cast again at every step (242 of the ~1,075 casts of a base-sized LoRA step, each a kernel
    launch in a launch-bound step). Stored in that dtype already, autocast leaves them alone. `.to` rounds as autocast's
    cast does, so under the same autocast the loss and gradients are bitwise unchanged.
    Left in fp32: anything trainable and LoRA's A/B (the optimizer and fp16's GradScaler need
    fp32 parameters), LayerNorms and embeddings (autocast runs them in fp32, so casting would
    round their values), and any tensor another module shares (BLIP's LM head is tied to the
    word embeddings). So `model.dtype`, the first parameter's, stays fp32. For training under
    autocast only: outside it fp32 activations meet half-precision weights and F.linear refuses.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cast_frozen_linears is for autocast's half-precision dtypes, not {dtype}")
    owners = {}  # storage -> modules holding a parameter in it (tied weights have two)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            key = p.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
    cast = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(part.startswith("lora_") for part in name.split(".")):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and owners[p.untyped_storage().data_ptr()] == 1:
                p.data = p.data.to(dtype)  # in place: the Parameter object (and anything holding it) stays
                cast += 1
    return cast


def save_adapter(model, out_dir: str) -> None:
    """PEFT's save_pretrained, with adapter_config.json naming transformers' own BLIP class.

    PEFT records the wrapped model's class in `auto_mapping`; ours is BlipForPetCaptioning from
    this project's model.py, which peft.AutoPeftModel refuses to import ("not in the import
    allowlist"). The subclass adds behaviour, not weights, so the stock class loads the adapter
    exactly, and plain transformers + peft tools can read it.
    """
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_mapping"] = {"base_model_class": BlipForConditionalGeneration.__name__,
                              "parent_library": BlipForConditionalGeneration.__module__}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_lora_for_inference(adapter_dir: str, base_model: Optional[str] = None, merge: bool = True,
                            dtype: torch.dtype = torch.float32, device="cpu", loaded_base=None):
    """Adapter folder -> (model in eval mode, processor). Merged into the base weights unless merge=False.

    loaded_base: the base model already in memory (evaluate.py and explainability.py need it for
    the zero-shot side too); the adapter is merged into a copy of it instead of loading it again.
    """
    from peft import PeftModel

    adapter_config = check_adapter(adapter_dir)
    base = base_model or adapter_config["base_model_name_or_path"]
    saved = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("processor_config.json", "preprocessor_config.json"))
    processor = load_processor(adapter_dir if saved else base)
    model = load_base_model(base, dtype=dtype) if loaded_base is None else copy.deepcopy(loaded_base)
    check_fits(model, processor, adapter_dir)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except Exception as e:  # safetensors, torch and peft each raise their own types here
        text = str(e)
        if "size mismatch" in text:
            raise UserError(f"adapter {adapter_dir!r} was trained on a base model of another shape than {base!r} "
                            "(size mismatch); pass the right --model_name_or_path") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"cannot load adapter {adapter_dir!r} ({type(e).__name__}: {first[:MAX_ERROR_CHARS]}); "
                        "the file may be corrupt or truncated: re-save or re-train it") from None
    check_loaded_keys(model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model = model.to(device).eval()
    # the stored tensors are finite (check_adapter), but lora_alpha / r scales them into the model
    check_finite_model(model, f"adapter {adapter_dir!r} (lora_alpha {adapter_config.get('lora_alpha')}, "
                              f"r {adapter_config.get('r')}) applied to {base!r}",
                       "check lora_alpha and r in its adapter_config.json, or re-train it")
    return model, processor


def check_loaded_keys(peft_model, adapter_dir: str, fix: str = "re-save or re-train it") -> None:
    """UserError unless the adapter file's tensors are exactly the LoRA weights of `peft_model`, in their shapes.

    PEFT loads non-strictly: weights under other module names (or target_modules that match other
    modules than the weights') are skipped with a warning, and the "fine-tuned" model is the base.
    Shapes, for a file that PEFT would refuse with a state-dict traceback (an r edited in the config).
    """
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # missing, truncated or not safetensors
        raise UserError(f"the adapter weights in {adapter_dir!r} cannot be read ({type(e).__name__}: "
                        f"{str(e)[:MAX_ERROR_CHARS]}); {fix}") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    extra, missing = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
    reshaped = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
    if extra or missing or reshaped:
        k = (reshaped or [None])[0]
        detail = (f"{len(extra)} stored weights match no LoRA module (first: {extra[:1]})" if extra else
                  f"{len(missing)} LoRA weights are not stored (first: {missing[:1]})" if missing else
                  f"{len(reshaped)} stored weights have other shapes than the LoRA modules (first: {k}, {saved[k]} "
                  f"stored, {expected[k]} in the model: another r or base model)")
        raise UserError(f"adapter {adapter_dir!r} does not fit its own adapter_config.json or this base model: {detail}; "
                        f"{fix}")


# ---------------------------------------------------------------------------
# Inference


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden state (B, 1 + patches, hidden): what the decoder attends to."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def vision_fingerprint(model, processor) -> str:
    """A short key that changes when the image embeddings would: vision config, preprocessing, every weight.

    All of the encoder's tensors (parameters and buffers, by name, dtype and shape), not a sample: two
    encoders that differ in one middle layer must not share cached embeddings.
    """
    from concurrent.futures import ThreadPoolExecutor

    h = hashlib.sha256()
    h.update(model.config.vision_config.to_json_string().encode())
    h.update(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
    tensors = sorted(model.vision_model.state_dict().items())
    # hashlib lets go of the GIL on big buffers: the tensors are hashed side by side (~0.7 GB/s a core)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = pool.map(_tensor_digest, [t for _, t in tensors])
        for (name, t), digest in zip(tensors, digests):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{digest}".encode())
    return h.hexdigest()[:16]


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, whatever its dtype (bfloat16 has no numpy type)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()


def has_vision_lora(model) -> bool:
    return any("vision_model" in n and "lora_" in n for n, _ in model.named_parameters())


@torch.no_grad()
def greedy_caption_ids(model, image_embeds: torch.Tensor, max_new_tokens: int = 30,
                       cuda_graph: Optional[bool] = None) -> torch.Tensor:
    """Greedy ids (B, 1 + steps) from bos [DEC]: the same ids as text_decoder.generate(num_beams=1).

    generate is launch-bound on a GPU: a step of the 12-layer decoder is ~250 small kernels plus
    Python bookkeeping (logits processors, stopping criteria, a growing cache, masks), while the
    arithmetic per step is tiny. This loop keeps the decoder's own modules (so LoRA layers, merged
    or not, apply) but holds the self-attention keys and values in buffers of a fixed size and
    computes the image-side cross-attention keys and values once. Every step then has the same
    shapes and touches the same memory, so on a GPU the whole step (argmax and end-of-caption
    bookkeeping included) is captured once as a CUDA graph and replayed: one launch per token.
    cuda_graph: None = on a GPU; False = plain calls (the CPU's way, or to compare). The graph
    checks itself on the process's first graphed batch (GraphSelfCheck) and is not used again
    after a failed capture or check. The start id comes from the model config: the real tokenizer
    has no bos token.
    """
    if cuda_graph is None:
        cuda_graph = image_embeds.device.type == "cuda"
    ids = _decode(model, image_embeds, max_new_tokens, graphed=True) if cuda_graph and not graph_decoding.off else None
    if ids is None:  # graphs off, or the capture failed
        return _decode(model, image_embeds, max_new_tokens, graphed=False)
    if not graph_decoding.passed:
        ids = graph_decoding.check(ids, _decode(model, image_embeds, max_new_tokens, graphed=False))
    return ids


def _decode(model, image_embeds: torch.Tensor, max_new_tokens: int, graphed: bool) -> Optional[torch.Tensor]:
    """The greedy loop, its step replayed as a CUDA graph or called plainly; None if the capture failed."""
    decoder = StaticGreedyDecoder(model, image_embeds, max_new_tokens)
    step = graphed_step(decoder.step, image_embeds.device) if graphed else decoder.step
    if step is None:
        return None
    # A host check of "every row has its [SEP]" waits for the device, so with a graph it is done
    # every few steps; the steps past the end only write padding, and are cut off below.
    check_every = GRAPH_CHECK_EVERY if graphed else 1
    for t in range(max_new_tokens):
        step()
        if (t + 1) % check_every == 0 and bool(decoder.done.all()):
            break
    return decoder.ids[:, :1 + int(decoder.steps)]


GRAPH_CHECK_EVERY = 4


class GraphSelfCheck:
    """Whether this process decodes with CUDA graphs: on until a capture fails or the self-check does.

    A replayed graph runs the kernels it recorded on the memory it recorded, so a capture that went
    wrong (an operation that records stale state, a buffer read before it is written) would change
    captions without an error. So the first graphed batch of a process is also decoded by the
    plain step loop and the ids compared. Cost: that one batch decoded a second time, the plain
    way (a batch at the speed without graphs), once per process. Any difference: one warning
    naming the first differing position, the plain loop's ids for that batch, and plain steps
    for the rest of the process. A failed capture turns graphs off the same way.
    """

    def __init__(self):
        self.passed = False  # the first graphed batch gave the plain loop's ids
        self.off = False  # capture or check failed: plain steps from now on

    def turn_off(self, why: str) -> None:
        if not self.off:
            logger.warning("self-check: decoding without CUDA graphs from now on (%s)", why)
        self.off = True

    def check(self, graphed: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """The ids to use for the checked batch: the graph's if they equal the plain loop's, else the plain loop's."""
        where = first_difference(graphed, plain)
        if where is None:
            self.passed = True
            logger.info("self-check passed: CUDA-graph decoding gave the plain loop's ids on its first batch "
                        "(%d rows x %d tokens)", *plain.shape)
            return graphed
        row, index, got, want = where
        self.turn_off(f"its first batch differs from the plain loop at row {row}, token {index}: "
                      f"id {got} instead of {want}")
        return plain


def first_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[tuple]:
    """(row, token index, a's id, b's id) where two (B, T) id tensors first differ, or None if they are equal.

    "First" in decoding order: the lowest token index at which any row differs, and the lowest row
    there. A row that is shorter reads -1 past its end (so lengths that differ are a difference).
    """
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"different batch sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    differ = (a != b).nonzero()
    if not len(differ):
        return None
    row, index = differ[differ[:, 1].argmin()].tolist()  # nonzero is row-major: the lowest row first
    return row, index, int(a[row, index]), int(b[row, index])


graph_decoding = GraphSelfCheck()  # one per process: the check runs once


class StaticGreedyDecoder:
    """Greedy decoding state in fixed-size tensors; step() advances every row by one token in place.

    Per layer the self-attention keys/values live in (B, heads, max_new_tokens, head) buffers
    written at the current position, and future positions are masked out; the cross-attention
    keys/values over the image tokens are computed once here. The arithmetic is the decoder's own
    (BlipTextSelfAttention's matmul / sqrt(d) / softmax / matmul; the modules' linear layers,
    output blocks, feed-forward and LM head), so the ids equal generate's.
    """

    def __init__(self, model, image_embeds: torch.Tensor, max_new_tokens: int):
        text_config = model.config.text_config
        decoder = model.text_decoder
        self.embeddings, self.layers, self.head = decoder.bert.embeddings, decoder.bert.encoder.layer, decoder.cls
        self.sep, self.pad = text_config.sep_token_id, text_config.pad_token_id
        batch, device = image_embeds.shape[0], image_embeds.device
        attn = self.layers[0].attention.self
        self.heads, self.head_size = attn.num_attention_heads, attn.attention_head_size
        self.scale = math.sqrt(self.head_size)
        # contiguous once here, or every step's matmul would copy them (577 x hidden per layer and image)
        self.cross = [(self._split(layer.crossattention.self.key(image_embeds)).contiguous(),
                       self._split(layer.crossattention.self.value(image_embeds)).contiguous()) for layer in self.layers]
        dtype = self.cross[0][0].dtype
        shape = (batch, self.heads, max(1, max_new_tokens), self.head_size)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.slots = torch.arange(shape[2], device=device)
        self.ids = torch.full((batch, 1 + max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.ids[:, 0] = text_config.bos_token_id
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # of the token fed next
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.steps = torch.zeros((), dtype=torch.long, device=device)  # steps taken while a row was unfinished

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, heads * head) -> (B, heads, T, head), as BlipTextSelfAttention lays out q, k and v."""
        return x.view(*x.shape[:-1], self.heads, self.head_size).transpose(1, 2)

    def _attend(self, query, keys, values, future=None):
        scores = torch.matmul(query, keys.transpose(-1, -2)) / self.scale
        if future is not None:
            scores = scores.masked_fill(future, float("-inf"))
        context = torch.matmul(torch.softmax(scores, dim=-1), values)
        return context.permute(0, 2, 1, 3).reshape(query.shape[0], 1, self.heads * self.head_size)

    def step(self) -> None:
        token = self.ids.index_select(1, self.position)  # (B, 1)
        x = self.embeddings(input_ids=token, position_ids=self.position.view(1, 1))
        future = self.slots > self.position  # buffer slots not written yet
        for layer, keys, values, (cross_k, cross_v) in zip(self.layers, self.keys, self.values, self.cross):
            attn = layer.attention.self
            keys.index_copy_(2, self.position, self._split(attn.key(x)))
            values.index_copy_(2, self.position, self._split(attn.value(x)))
            h = layer.attention.output(self._attend(self._split(attn.query(x)), keys, values, future), x)
            cross = layer.crossattention
            h = cross.output(self._attend(self._split(cross.self.query(h)), cross_k, cross_v), h)
            x = layer.feed_forward_chunk(h)
        token = self.head(x)[:, -1].argmax(-1).masked_fill(self.done, self.pad)  # finished rows get padding, as in generate
        self.steps += (~self.done).any().long()
        self.done |= token == self.sep
        self.ids.index_copy_(1, self.position + 1, token.unsqueeze(1))
        self.position += 1


def graphed_step(step, device):
    """step() captured as a CUDA graph, so that a replay is one launch; None (and graphs off) if capture fails.

    As torch's docs do it: a warm-up call on a side stream (lazy cuBLAS and kernel set-up must not
    happen during capture), then the capture. The warm-up really runs, so the decoding state it
    advanced is put back; the key/value slot it wrote is overwritten by the first real step. Under
    autocast (validation during training) the capture runs with autocast's weight-cast cache off,
    as CUDA graphs require; the casts then are part of the graph.
    """
    state = step.__self__
    advanced = (state.ids, state.position, state.done, state.steps)  # what a step changes besides the K/V slot
    saved = [t.clone() for t in advanced]
    autocast = torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                              enabled=torch.is_autocast_enabled(device.type), cache_enabled=False)
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), autocast:
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader thread pinning memory meanwhile must not abort the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast:
            step()
    except RuntimeError as e:  # a torch or driver without graph support for some op: slower, same ids
        graph_decoding.turn_off(f"capture failed: {str(e).splitlines()[0][:MAX_ERROR_CHARS]}")
        if torch.cuda.is_available():
            torch.cuda.synchronize(device)
        return None
    for tensor, value in zip(advanced, saved):
        tensor.copy_(value)
    return graph.replay


@torch.no_grad()
def caption_ids_from_embeddings(model, image_embeds: torch.Tensor, max_new_tokens: int = 30, num_beams: int = 1):
    """Generated token ids (B, T), starting with bos [DEC], and a mask that ends after the first [SEP]."""
    text_config = model.config.text_config
    if num_beams == 1:
        ids = greedy_caption_ids(model, image_embeds, max_new_tokens)
    else:
        ids = _generate_ids(model, image_embeds, max_new_tokens, num_beams)
    # Keep everything up to and including the first [SEP]; batch padding after it is masked out
    is_sep = (ids == text_config.sep_token_id).long()
    after_sep = (is_sep.cumsum(1) - is_sep) > 0
    return ids, (~after_sep).long()


def _generate_ids(model, image_embeds: torch.Tensor, max_new_tokens: int, num_beams: int) -> torch.Tensor:
    """transformers' generate from bos [DEC] (beam search; greedy_caption_ids is the fast greedy path)."""
    text_config = model.config.text_config
    batch = image_embeds.shape[0]
    input_ids = torch.full((batch, 1), text_config.bos_token_id, dtype=torch.long, device=image_embeds.device)
    return model.text_decoder.generate(
        input_ids=input_ids,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
    )


@torch.no_grad()
def captions_from_embeddings(model, processor, image_embeds: torch.Tensor, max_new_tokens: int = 30,
                             num_beams: int = 1) -> list:
    """Greedy (or beam) captions from precomputed image embeddings, as BLIP's generate does them."""
    ids, _ = caption_ids_from_embeddings(model, image_embeds, max_new_tokens, num_beams)
    return [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_caption(model, processor, images: list, batch_size: int = 32, max_new_tokens: int = 30,
                     num_beams: int = 1) -> list:
    """Captions for a list of PIL images, batched."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    captions = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        embeds = image_embeddings(model, pixels.to(device, dtype))
        captions += captions_from_embeddings(model, processor, embeds, max_new_tokens, num_beams)
    return captions


# ---------------------------------------------------------------------------
# Evaluation helpers: adapter checks, shared image embeddings, caption likelihoods


def check_adapter(adapter_dir: str) -> dict:
    """adapter_config.json of a complete, readable adapter folder; otherwise one clear UserError."""
    from safetensors import safe_open

    if not os.path.isdir(adapter_dir):
        raise UserError(f"adapter folder {adapter_dir!r} does not exist; train one with `python train.py` or pass --adapter")
    finish_interrupted_save(adapter_dir)  # train.py killed while moving the adapter's files in: complete it first
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(config_path):
        raise UserError(f"{adapter_dir!r} has no adapter_config.json; is it the output folder of train.py?")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            raise UserError(f"{adapter_dir!r} holds only adapter_model.bin, a pickle that can run code when loaded; "
                            "refused: only safetensors adapters load (re-save it with save_pretrained where you trust it)")
        raise UserError(f"{adapter_dir!r} has no adapter_model.safetensors; is it the output folder of train.py?")
    try:
        with open(config_path) as f:
            config = json.load(f)
        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
            # a diverged or damaged adapter loads fine and then captions garbage: refuse non-finite weights
            broken = [k for k in keys if f.get_slice(k).get_dtype().startswith(("F", "BF"))
                      and not torch.isfinite(f.get_tensor(k)).all()]
    except Exception as e:  # broken JSON, truncated or corrupt safetensors
        raise UserError(f"adapter {adapter_dir!r} is incomplete, corrupt or truncated: {type(e).__name__}: {str(e)[:MAX_ERROR_CHARS]}; "
                        "re-save or re-train it") from None
    if not isinstance(config, dict) or not config.get("base_model_name_or_path"):
        raise UserError(f"{config_path} names no base_model_name_or_path; pass --model_name_or_path")
    if not keys:
        raise UserError(f"{weights} holds no tensors")
    if broken:
        raise UserError(f"adapter {adapter_dir!r} has NaN or infinite weights ({len(broken)} tensors, first: {broken[0]}); "
                        "re-train it")
    return config


def _adapter_run(adapter_dir: str) -> dict:
    """The adapter's run_config.json (written by train.py), or {} when it is missing or unreadable."""
    try:
        with open(os.path.join(adapter_dir, "run_config.json")) as f:
            run = json.load(f)
        return run if isinstance(run, dict) else {}
    except (OSError, ValueError):
        return {}


def data_for(cfg, adapter_dir: str) -> str:
    """The data set evaluate.py and explainability.py use: --dataset if given, else the one the adapter was trained on."""
    trained = (_adapter_run(adapter_dir).get("PetConfig") or {}).get("dataset")
    return cfg.dataset or trained or DEFAULT_DATASET


def adapter_split_settings(adapter_dir: str, cfg, split: str, seed: int) -> tuple:
    """(val_fraction, seed) that rebuild the adapter's own train/validation split, from its run_config.json.

    Another seed or fraction would draw another "validation" set, mostly training images. The test
    split depends on them only for a data set without a test split (then a seeded half is held out).
    """
    try:
        run = _adapter_run(adapter_dir)
        trained = run["PetConfig"]
        fraction, trained_seed = float(trained["val_fraction"]), int(run["TrainConfig"]["seed"])
    except (ValueError, KeyError, TypeError):
        if split != "test":
            raise UserError(f"--split {split} needs the adapter's run_config.json (its seed and val_fraction), which "
                            f"{adapter_dir!r} lacks or cannot be read; use --split test") from None
        return cfg.val_fraction, seed
    if split != "test" and not same_source(trained.get("dataset"), cfg.dataset):
        logger.warning("the adapter was trained on %r, not %r: --split %s is rebuilt on another data set than its own",
                       trained.get("dataset"), cfg.dataset, split)
    if (fraction, trained_seed) != (cfg.val_fraction, seed):
        logger.info("splitting the data as the adapter's training run did: val_fraction %g, seed %d", fraction, trained_seed)
    return fraction, trained_seed


def base_model_for(cfg, adapter_dir: str) -> str:
    """The base model evaluate.py and explainability.py use: --model_name_or_path if given, else the adapter's own."""
    return cfg.model_name_or_path or check_adapter(adapter_dir)["base_model_name_or_path"]


def same_vision_encoder(a, b) -> bool:
    """True when two BLIP models have identical vision encoders, so image embeddings can be shared."""
    pa, pb = dict(a.vision_model.named_parameters()), dict(b.vision_model.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape and torch.equal(pa[k], pb[k]) for k in pa)


@torch.no_grad()
def caption_log_likelihoods(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            max_rows: int = 128) -> torch.Tensor:
    """log p(caption | image) of C candidate captions for B images: a (B, C) float32 tensor.

    image_embeds (B, N, H) come from image_embeddings(); input_ids / attention_mask (C, T) from
    tokenize_captions (bos first). The score is the sum of the log-probabilities of tokens 1..T-1
    ([SEP] included, padding excluded), from the raw logits (no label smoothing, whatever the
    config's text_config.label_smoothing says).

    All C candidates of an image go through the decoder as ONE packed sequence (pack_candidates):
    the tokens they all start with ("[DEC] a photo of") once, then each candidate's own tokens,
    unpadded, with a mask that lets each see only the shared start and itself, and positions as
    if it were decoded alone. So the image-side cross-attention keys and values (577 x 768 per
    layer) are computed once per image, not once per candidate, and the shared start once, not
    C times. At most max_rows // C images go through the decoder at a time.
    """
    device = image_embeds.device
    num_candidates = input_ids.shape[0]
    packed = pack_candidates(input_ids, attention_mask)
    ids, positions, segments = (packed[k].to(device) for k in ("input_ids", "position_ids", "segments"))
    # row i may see row j: j is not later in its caption, and j is shared or of i's own candidate
    allowed = (positions[None, :] <= positions[:, None]) & ((segments[None, :] < 0) | (segments[None, :] == segments[:, None]))
    dtype = image_embeds.dtype if image_embeds.dtype.is_floating_point else torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    targets = packed["targets"].to(device)
    # (rows, C): row r's next-token log-prob counts for candidate c; the shared rows count for all
    counts = (segments[:, None] == torch.arange(num_candidates, device=device)) | (segments[:, None] == SHARED)
    last = packed["last_shared"]  # predicts each candidate's first own token: a different target per candidate
    counts[last] = False  # scored separately (first, below)
    counts = counts.float()
    first_targets = packed["first_targets"].to(device)
    per_chunk = max(1, max_rows // num_candidates)
    scores = []
    for start in range(0, image_embeds.shape[0], per_chunk):
        emb = image_embeds[start:start + per_chunk]
        n = emb.shape[0]
        hidden = model.text_decoder.bert(input_ids=ids.expand(n, -1), position_ids=positions.expand(n, -1),
                                         attention_mask=mask.expand(n, 1, -1, -1), encoder_hidden_states=emb,
                                         is_decoder=True, use_cache=False).last_hidden_state
        logits = model.text_decoder.cls(hidden).float()
        normaliser = torch.logsumexp(logits, -1)  # log_softmax at the targets, without a second logits-sized tensor
        token_logp = logits.gather(-1, targets.expand(n, -1).unsqueeze(-1)).squeeze(-1) - normaliser
        first = logits[:, last].index_select(-1, first_targets) - normaliser[:, last, None]
        scores.append(token_logp @ counts + first)
    return torch.cat(scores)


SHARED = -1  # segment of the packed rows that all candidates share


def pack_candidates(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """C tokenised captions (C, T) as one packed row sequence for caption_log_likelihoods.

    The first P tokens, identical in every caption (at least [DEC]), come once; then, per caption,
    its tokens P..end-1 without padding (its last token, [SEP], is only ever a target). Each row
    gets its position in its own caption, its segment (SHARED or the caption's index) and the
    token it predicts (targets). Row P-1 (last_shared) predicts each caption's first own token,
    a different one per caption (first_targets), so its entry in targets is a placeholder.
    """
    lengths = attention_mask.sum(1).tolist()
    rows = [ids[:n].tolist() for ids, n in zip(input_ids, lengths)]
    shared = 0
    while shared < min(lengths) - 1 and len({r[shared] for r in rows}) == 1:
        shared += 1
    if shared == 0:  # tokenize_captions starts every caption with [DEC] and ends it with [SEP]
        raise ValueError("candidate captions need a common first token and at least two tokens each")
    prefix = rows[0][:shared]
    ids, positions, segments, targets = list(prefix), list(range(shared)), [SHARED] * shared, prefix[1:] + [0]
    for c, r in enumerate(rows):
        ids += r[shared:-1]
        positions += list(range(shared, len(r) - 1))
        segments += [c] * (len(r) - 1 - shared)
        targets += r[shared + 1:]
    long = dict(dtype=torch.long)
    return {"input_ids": torch.tensor(ids, **long), "position_ids": torch.tensor(positions, **long),
            "segments": torch.tensor(segments, **long), "targets": torch.tensor(targets, **long),
            "last_shared": shared - 1, "first_targets": torch.tensor([r[shared] for r in rows], **long)}


def breed_candidates(model, tokenizer, template: str, breeds=None):
    """Tokenised templated captions of `breeds` (default: all 37), for rank_breeds; start id from `model`'s config."""
    breeds = list(range(NUM_BREEDS)) if breeds is None else list(breeds)
    return tokenize_captions(tokenizer, [caption_for(b, template) for b in breeds], model.config.text_config.bos_token_id)


@torch.no_grad()
def rank_breeds(model, image_embeds: torch.Tensor, candidates, max_rows: Optional[int] = None) -> tuple:
    """(scores (B, K), order (B, K)): caption log-likelihood of each breed, and breeds best first.

    max_rows: candidate rows per decoder pass; default 128 on a CPU and 37 x 32 on a GPU, where a
    pass of 3 images is launch-bound (32 images of 37 candidates need ~6 GB for the logits).
    """
    if max_rows is None:
        max_rows = NUM_BREEDS * 32 if image_embeds.device.type == "cuda" else 128
    scores = caption_log_likelihoods(model, image_embeds, *candidates, max_rows=max_rows)
    return scores, torch.sort(scores, dim=-1, descending=True, stable=True).indices


def check_fits(model, processor, source: str) -> None:
    """UserError when the processor from `source` (a model or adapter folder) does not fit `model`.

    Checks the vocabulary, the image size and the decoder's start token: training writes the
    config's bos id first and generation starts from it, so a tokenizer whose [DEC] has another id
    would train on one start token and caption from another, silently.
    """
    text = model.config.text_config
    vocab, image_size = text.vocab_size, model.config.vision_config.image_size
    height = (processor.image_processor.size or {}).get("height")
    if len(processor.tokenizer) > vocab or (height is not None and height != image_size):
        raise UserError(f"the processor of {source!r} does not fit the base model: it has "
                        f"{len(processor.tokenizer)} tokens and {height}px images, the model {vocab} tokens and "
                        f"{image_size}px images; pass the matching --model_name_or_path")
    start = processor.tokenizer.bos_token_id
    if start != text.bos_token_id:
        raise UserError(f"the tokenizer of {source!r} starts captions with {processor.tokenizer.bos_token!r} (id {start}) "
                        f"but the model's decoder starts from id {text.bos_token_id} (text_config.bos_token_id); "
                        "use the tokenizer that belongs to this checkpoint")


# Cross-attention: where the caption decoder looks (explainability.py)
#
# generate(output_attentions=True) returns the decoder's self-attentions only. The maps come
# from a second, teacher-forced pass of the text decoder over the generated ids, whose output
# has one cross-attention tensor per layer, (B, heads, T, 1 + patches). Position 0 of the last
# axis is the vision CLS token; the rest is the patch grid, row-major. Row i is the query at
# token i, i.e. the step that predicts token i + 1.


def patch_grid(model) -> tuple:
    """(rows, cols) of the vision encoder's patch grid: 24x24 for the 384 px, patch 16 base model."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


@torch.no_grad()
def cross_attention_maps(model, pixel_values_or_embeds: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, layers=None) -> torch.Tensor:
    """Decoder cross-attention over the image patches, (B, T, grid_rows, grid_cols), float32.

    Teacher-forced over `input_ids`; averaged over heads and the chosen `layers` (indices into the
    decoder's layers, negative allowed; None = all); the vision CLS token is dropped and each
    row renormalised, so every map is a distribution over patches (sums to 1). Row i is the
    attention of the step that predicts token i + 1.
    """
    embeds = pixel_values_or_embeds
    if embeds.dim() == 4:  # pixel values (B, 3, H, W)
        embeds = image_embeddings(model, embeds)
    num_layers = model.config.text_config.num_hidden_layers
    chosen = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not -num_layers <= i < num_layers]
    if not chosen or bad:
        raise UserError(f"--layers {bad or chosen} is out of range: the decoder has {num_layers} layers (0-{num_layers - 1}, or negative from the end)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = model.text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=embeds,
                             output_attentions=True, return_dict=True)
    if out.cross_attentions is None:
        raise RuntimeError("the text decoder returned no cross_attentions; it needs eager attention")
    attn = torch.stack([out.cross_attentions[i].float() for i in chosen]).mean(dim=(0, 2))  # (B, T, 1 + patches)
    patches = attn[..., 1:]
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    rows, cols = patch_grid(model)
    if patches.shape[-1] != rows * cols:
        raise RuntimeError(f"expected {rows}x{cols} patches from the model config, got {patches.shape[-1]}")
    return patches.reshape(*patches.shape[:2], rows, cols)
