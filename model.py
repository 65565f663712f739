"""BLIP + LoRA: load the base model and processor, wrap it with LoRA, save, reload and check adapters, load the
zero-shot + fine-tuned pair. Captioning and ranking are inference.py; cross-attention is attention.py."""

import copy
import json
import logging
import os
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from transformers import BertTokenizer, BlipForConditionalGeneration, BlipProcessor
from transformers.models.blip import BlipImageProcessorPil
from transformers.models.blip.modeling_blip import BlipAttention, BlipForConditionalGenerationModelOutput

if TYPE_CHECKING:
    from peft import PeftModel

from run_io import UserError, first_line, from_pretrained_kwargs, offline_hint, same_source

logger = logging.getLogger(__name__)
MAX_ERROR_CHARS = 200  # of a library's exception text inside our one-line error: enough to name the problem


def load_processor(name_or_path: str) -> BlipProcessor:
    """BlipProcessor with the PIL image processor (torchvision is optional, so don't depend on it)."""
    kwargs = from_pretrained_kwargs(name_or_path, "--model_name_or_path")
    try:
        image_processor = BlipImageProcessorPil.from_pretrained(name_or_path, **kwargs)
        tokenizer = BertTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from e
        raise UserError(
            f"no BLIP processor (preprocessor_config.json, tokenizer files) found at {name_or_path!r}"
        ) from e
    except Exception as e:  # garbled tokenizer.json / JSON configs: tokenizers and json raise their own types
        raise UserError(
            f"the processor files at {name_or_path!r} are corrupt ({type(e).__name__}: {str(e)[:150]}); "
            "restore them from the original model"
        ) from e
    add_decoder_tokens(tokenizer)
    return BlipProcessor(image_processor, tokenizer)


def add_decoder_tokens(tokenizer: BertTokenizer) -> None:
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
            return super().forward(
                pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        image_embeds = image_embeds.to(self.text_decoder.dtype)  # the cache stores half precision
        if labels is None:
            out = self.text_decoder(
                input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds, **kwargs
            )
            return BlipForConditionalGenerationModelOutput(logits=out.logits, image_embeds=image_embeds)
        return BlipForConditionalGenerationModelOutput(
            loss=self.caption_loss(image_embeds, input_ids, attention_mask, labels, **kwargs), image_embeds=image_embeds
        )

    def caption_loss(self, image_embeds, input_ids, attention_mask, labels, **kwargs) -> torch.Tensor:
        """BLIP's captioning loss (next-token cross-entropy, its label smoothing, the mean over labelled tokens),
        with the LM head run on the labelled positions only.

        BLIP's own loss projects every position, padding too, onto the 30,524-word vocabulary and
        copies those logits once more before the loss: most of a decoder step's work at the demo's
        sizes. The positions it ignores (label -100) add nothing to its loss, so leaving them out
        gives the same loss and gradients (tests/test_train_step.py).
        """
        decoder = self.text_decoder
        kwargs.pop("use_cache", None)  # no key/value cache in training, as BLIP's forward does with labels
        hidden = decoder.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=True,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        hidden, targets = hidden[:, :-1], labels[:, 1:]  # position i predicts token i + 1
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            # one compiled graph (--torch_compile) or CUDA graph (--cuda_graphs) holds no shape that depends
            # on the data: every position there, as BLIP does
            hidden, targets = hidden.flatten(0, 1), targets.flatten()
        else:
            scored = targets != -100
            hidden, targets = hidden[scored], targets[scored]
        return torch.nn.functional.cross_entropy(
            decoder.cls(hidden), targets, ignore_index=-100, label_smoothing=decoder.label_smoothing
        )


class BlipVisionSdpaAttention(BlipAttention):
    """BLIP's vision self-attention through torch.nn.functional.scaled_dot_product_attention.

    transformers has no SDPA path for BLIP. Same weights and, in fp32, the same outputs as eager
    (to rounding); a faster encoder (benchmarks/bench.py, "vision encoder" row). Asked for attention weights
    (output_attentions=True) it falls back to the eager computation, which returns them.
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        if kwargs.get("output_attentions"):
            return super().forward(hidden_states, **kwargs)
        bsz, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(bsz, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = torch.nn.functional.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
        )
        return self.projection(context.transpose(1, 2).reshape(bsz, length, dim)), None


def set_vision_attention(
    model: BlipForConditionalGeneration, implementation: str = "sdpa"
) -> BlipForConditionalGeneration:
    """Switch every BLIP vision self-attention in `model` between "sdpa" and "eager" (same weights)."""
    cls = {"sdpa": BlipVisionSdpaAttention, "eager": BlipAttention}[implementation]
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.__class__ = cls
    return model


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> BlipForPetCaptioning:
    kwargs = from_pretrained_kwargs(name_or_path, "--model_name_or_path")
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
            # transformers would load the adapter's own base and apply the adapter: the "zero-shot" model
            # would be the fine-tuned one, silently
            raise UserError(
                f"{name_or_path!r} holds a LoRA adapter, not a base model; pass it as --adapter and leave "
                "out --model_name_or_path (the adapter names its base) or pass the base model's folder"
            )
        # The saved adapter records this as its base: absolute, so it loads from any working directory
        name_or_path = os.path.abspath(name_or_path)
    try:
        model, info = BlipForPetCaptioning.from_pretrained(
            name_or_path, dtype=dtype, output_loading_info=True, **kwargs
        )
    except OSError as e:
        if kwargs.get("local_files_only"):
            raise UserError(offline_hint("model", name_or_path, "--model_name_or_path")) from e
        raise UserError(
            f"no BLIP captioning model (config.json and model.safetensors or pytorch_model.bin) found at "
            f"{name_or_path!r}; pass a model folder or Hub id to --model_name_or_path"
        ) from e
    except Exception as e:  # a truncated or corrupt weights file: safetensors and torch raise their own types
        raise UserError(
            f"cannot load the model at {name_or_path!r} ({type(e).__name__}: {str(e)[:150]}); "
            "the weights may be corrupt or truncated: download them again"
        ) from e
    # transformers fills missing weights with random ones and only logs it: a model that is partly random is no base
    # (position_ids are buffers the model rebuilds; the Hub's 4.26-era .bin stores them, newer files do not)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.endswith("position_ids"))
    if missing:
        raise UserError(
            f"the model at {name_or_path!r} lacks {len(missing)} weights (first: {', '.join(missing[:3])}); "
            "it is incomplete: download it again"
        )
    check_finite_model(model, f"the model at {name_or_path!r}", "it is damaged: download it again")
    return model


WEIGHT_FILES = (".safetensors", ".bin", ".index.json")


def weights_fingerprint(name_or_path: str, model=None) -> Optional[str]:
    """What identifies a base model's weights: a hash of a local folder's weight files, or a Hub id and the
    commit it was loaded from (`model`'s config records it); None where neither is known."""
    import hashlib

    if os.path.isdir(name_or_path):
        files = sorted(f for f in os.listdir(name_or_path) if f.endswith(WEIGHT_FILES))
        if not files:
            return None
        digest = hashlib.sha256()
        for name in files:
            digest.update(name.encode())
            with open(os.path.join(name_or_path, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()[:32]
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{name_or_path}@{commit}" if commit else None


@torch.no_grad()
def check_finite_model(model: torch.nn.Module, what: str, fix: str) -> None:
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
        raise UserError(
            f"{what} computes NaN or infinite outputs in {str(param.dtype).replace('torch.', '')}; {fix}{half}"
        )


def create_lora_model(
    model: BlipForPetCaptioning,
    r: int = 32,
    alpha: int = 64,
    dropout: float = 0.05,
    target_modules: str = "query,value",
    use_dora: bool = False,
    use_rslora: bool = False,
) -> "PeftModel":
    """Wrap `model` with LoRA adapters; task_type stays unset (CAUSAL_LM breaks BLIP's forward).

    use_dora: DoRA (each target's weight split into a direction, which LoRA changes, and a trained magnitude
    per output); use_rslora: scale by alpha / sqrt(r) instead of alpha / r. Both are PEFT's LoraConfig fields.
    """
    from peft import LoraConfig, get_peft_model

    targets = (
        [t.strip() for t in target_modules.split(",") if t.strip()]
        if isinstance(target_modules, str)
        else list(target_modules)
    )
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(
            f"--lora_target_modules {','.join(unknown)} match no module of this model; e.g. query,value,key,dense"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    return get_peft_model(model, config)


def adapter_variant(adapter_config: dict) -> str:
    """Which kind of LoRA an adapter_config.json describes: LoRA, DoRA, rsLoRA or DoRA + rsLoRA."""
    dora, rslora = adapter_config.get("use_dora") is True, adapter_config.get("use_rslora") is True
    if dora and rslora:
        return "DoRA + rsLoRA"
    return "DoRA" if dora else "rsLoRA" if rslora else "LoRA"


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of `model`'s nn.Linear layers in `dtype` (autocast's); returns how many.

    Under autocast every Linear casts its fp32 weight and bias to bf16/fp16 on each call, and
    autocast keeps the cast only for leaf tensors that require grad: the frozen base weights are
    cast again at every step, each cast a kernel launch in a launch-bound step. Stored in that dtype
    already, autocast leaves them alone. `.to` rounds as autocast's
    cast does, so under the same autocast the loss and gradients are bitwise unchanged.
    Left in fp32: anything trainable and LoRA's A/B (the optimizer and fp16's GradScaler need
    fp32 parameters), LayerNorms and embeddings (autocast runs them in fp32, so casting would
    round their values), and any tensor another module shares (BLIP's LM head is tied to the
    word embeddings). So `model.dtype`, the first parameter's, stays fp32. DoRA's targets stay fp32 too: DoRA
    reads their weight itself, outside autocast's cast, for the norm its magnitudes divide by. For training under
    autocast only: outside it fp32 activations meet half-precision weights and F.linear refuses.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cast_frozen_linears is for autocast's half-precision dtypes, not {dtype}")
    dora_bases = {id(m.base_layer) for m in model.modules() if getattr(m, "lora_magnitude_vector", None)}
    owners = {}  # storage -> modules holding a parameter in it (tied weights have two)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            key = p.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
    cast = 0
    for name, module in model.named_modules():
        if (
            not isinstance(module, torch.nn.Linear)
            or id(module) in dora_bases
            or any(part.startswith("lora_") for part in name.split("."))
        ):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32 and owners[p.untyped_storage().data_ptr()] == 1:
                p.data = p.data.to(dtype)  # in place: the Parameter object (and anything holding it) stays
                cast += 1
    return cast


def save_adapter(model: "PeftModel", out_dir: str) -> None:
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
    config["auto_mapping"] = {
        "base_model_class": BlipForConditionalGeneration.__name__,
        "parent_library": BlipForConditionalGeneration.__module__,
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_lora_for_inference(
    adapter_dir: str,
    base_model: Optional[str] = None,
    merge: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    loaded_base: Optional[BlipForPetCaptioning] = None,
    adapter_config: Optional[dict] = None,
) -> tuple:
    """Adapter folder -> (model in eval mode, processor). Merged into the base weights unless merge=False.

    loaded_base: the base model already in memory (evaluate.py and explainability.py need it for
    the zero-shot side too); the adapter is merged into a copy of it instead of loading it again.
    adapter_config: check_adapter's result when the caller has it already (the scripts' AdapterRun).
    """
    from peft import PeftModel

    adapter_config = adapter_config or check_adapter(adapter_dir)
    base = base_model or adapter_config["base_model_name_or_path"]
    saved = any(
        os.path.isfile(os.path.join(adapter_dir, f)) for f in ("processor_config.json", "preprocessor_config.json")
    )
    processor = load_processor(adapter_dir if saved else base)
    model = load_base_model(base, dtype=dtype) if loaded_base is None else copy.deepcopy(loaded_base)
    check_fits(model, processor, adapter_dir)
    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except Exception as e:  # safetensors, torch and peft each raise their own types here
        text = str(e)
        if "size mismatch" in text:
            raise UserError(
                f"adapter {adapter_dir!r} was trained on a base model of another shape than {base!r} "
                "(size mismatch); pass the right --model_name_or_path"
            ) from e
        first = first_line(e) or type(e).__name__
        raise UserError(
            f"cannot load adapter {adapter_dir!r} ({type(e).__name__}: {first[:MAX_ERROR_CHARS]}); "
            "the file may be corrupt or truncated: re-save or re-train it"
        ) from e
    check_loaded_keys(model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model = model.to(device).eval()
    # the stored tensors are finite (check_adapter), but lora_alpha / r scales them into the model
    check_finite_model(
        model,
        f"adapter {adapter_dir!r} (lora_alpha {adapter_config.get('lora_alpha')}, "
        f"r {adapter_config.get('r')}) applied to {base!r}",
        "check lora_alpha and r in its adapter_config.json, or re-train it",
    )
    return model, processor


def check_loaded_keys(peft_model: "PeftModel", adapter_dir: str, fix: str = "re-save or re-train it") -> None:
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
        raise UserError(
            f"the adapter weights in {adapter_dir!r} cannot be read ({type(e).__name__}: "
            f"{str(e)[:MAX_ERROR_CHARS]}); {fix}"
        ) from e
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    extra, missing = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
    reshaped = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
    if extra or missing or reshaped:
        k = (reshaped or [None])[0]
        detail = (
            f"{len(extra)} stored weights match no LoRA module (first: {extra[:1]})"
            if extra
            else f"{len(missing)} LoRA weights are not stored (first: {missing[:1]})"
            if missing
            else f"{len(reshaped)} stored weights have other shapes than the LoRA modules (first: {k}, {saved[k]} "
            f"stored, {expected[k]} in the model: another r or base model)"
        )
        raise UserError(
            f"adapter {adapter_dir!r} does not fit its own adapter_config.json or this base model: {detail}; {fix}"
        )


def has_vision_lora(model: torch.nn.Module) -> bool:
    return any("vision_model" in n and "lora_" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------
# Adapter checks and the zero-shot + fine-tuned pair


def check_adapter(adapter_dir: str) -> dict:
    """adapter_config.json of a complete, readable adapter folder; otherwise one clear UserError."""
    from safetensors import safe_open

    if not os.path.isdir(adapter_dir):
        raise UserError(
            f"adapter folder {adapter_dir!r} does not exist; train one with `python train.py` or pass --adapter"
        )
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(config_path):
        raise UserError(f"{adapter_dir!r} has no adapter_config.json; is it the output folder of train.py?")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            raise UserError(
                f"{adapter_dir!r} holds only adapter_model.bin, a pickle that can run code when loaded; "
                "refused: only safetensors adapters load (re-save it with save_pretrained where you trust it)"
            )
        raise UserError(f"{adapter_dir!r} has no adapter_model.safetensors; is it the output folder of train.py?")
    try:
        with open(config_path) as f:
            config = json.load(f)
        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
            # a diverged or damaged adapter loads fine and then captions garbage: refuse non-finite weights
            broken = [
                k
                for k in keys
                if f.get_slice(k).get_dtype().startswith(("F", "BF")) and not torch.isfinite(f.get_tensor(k)).all()
            ]
    except Exception as e:  # broken JSON, truncated or corrupt safetensors
        raise UserError(
            f"adapter {adapter_dir!r} is incomplete, corrupt or truncated: "
            f"{type(e).__name__}: {str(e)[:MAX_ERROR_CHARS]}; "
            "re-save or re-train it"
        ) from e
    if not isinstance(config, dict) or not config.get("base_model_name_or_path"):
        raise UserError(f"{config_path} names no base_model_name_or_path; pass --model_name_or_path")
    if not keys:
        raise UserError(f"{weights} holds no tensors")
    if broken:
        raise UserError(
            f"adapter {adapter_dir!r} has NaN or infinite weights ({len(broken)} tensors, first: {broken[0]}); "
            "re-train it"
        )
    return config


def same_vision_encoder(a: BlipForConditionalGeneration, b: BlipForConditionalGeneration) -> bool:
    """True when two BLIP models have identical vision encoders, so image embeddings can be shared."""
    pa, pb = dict(a.vision_model.named_parameters()), dict(b.vision_model.named_parameters())
    return pa.keys() == pb.keys() and all(pa[k].shape == pb[k].shape and torch.equal(pa[k], pb[k]) for k in pa)


class ModelPair(NamedTuple):
    """The zero-shot base and the fine-tuned model that evaluate.py, explainability.py and app.py compare."""

    zero_shot: BlipForPetCaptioning
    fine_tuned: BlipForPetCaptioning
    processor: BlipProcessor
    shared_vision: bool  # identical vision encoders (LoRA on the text decoder only): embed each image once

    @property
    def models(self) -> dict:
        return {"zero_shot": self.zero_shot, "fine_tuned": self.fine_tuned}


def load_model_pair(
    base_name: str,
    adapter_dir: str,
    device: str | torch.device,
    dtype: torch.dtype,
    adapter_config: Optional[dict] = None,
    trained_on: Optional[str] = None,
) -> ModelPair:
    """The base model (zero-shot) and the adapter merged into a copy of it (fine-tuned), both in eval mode on device.

    trained_on: the weights_fingerprint of the base the adapter was trained on; that base (the adapter's own
    base_model_name_or_path) holding other weights now (rebuilt or replaced in place) is refused: the adapter's
    changes belong to the weights they were learnt on. Another base, given on purpose, is left to the fit checks.
    """
    own_base = (adapter_config or {}).get("base_model_name_or_path")
    if own_base is not None and not same_source(base_name, own_base):
        trained_on = None
    zero_shot = load_base_model(base_name, dtype=dtype)
    now = weights_fingerprint(base_name, zero_shot) if trained_on else None
    same_kind = now is not None and now.startswith("sha256:") == trained_on.startswith("sha256:")
    if same_kind and now != trained_on:  # a folder's files against a Hub commit tell nothing
        raise UserError(
            f"adapter {adapter_dir!r} was trained on other weights than {base_name!r} holds now (fingerprint "
            f"{trained_on}, now {now}): the base was rebuilt or replaced; train the adapter again on it"
        )
    fine_tuned, processor = load_lora_for_inference(
        adapter_dir,
        base_model=base_name,
        dtype=dtype,
        device=device,
        loaded_base=zero_shot,
        adapter_config=adapter_config,
    )  # merged into a copy: the base loads once
    zero_shot = zero_shot.to(device).eval()
    return ModelPair(zero_shot, fine_tuned, processor, same_vision_encoder(zero_shot, fine_tuned))


def check_fits(model: BlipForConditionalGeneration, processor: BlipProcessor, source: str) -> None:
    """UserError when the processor from `source` (a model or adapter folder) does not fit `model`.

    Checks the vocabulary, the image size and the decoder's start token: training writes the
    config's bos id first and generation starts from it, so a tokenizer whose [DEC] has another id
    would train on one start token and caption from another, silently.
    """
    text = model.config.text_config
    vocab, image_size = text.vocab_size, model.config.vision_config.image_size
    height = (processor.image_processor.size or {}).get("height")
    if len(processor.tokenizer) > vocab or (height is not None and height != image_size):
        raise UserError(
            f"the processor of {source!r} does not fit the base model: it has "
            f"{len(processor.tokenizer)} tokens and {height}px images, the model {vocab} tokens and "
            f"{image_size}px images; pass the matching --model_name_or_path"
        )
    start = processor.tokenizer.bos_token_id
    if start != text.bos_token_id:
        raise UserError(
            f"the tokenizer of {source!r} starts captions with {processor.tokenizer.bos_token!r} (id {start}) "
            f"but the model's decoder starts from id {text.bos_token_id} (text_config.bos_token_id); "
            "use the tokenizer that belongs to this checkpoint"
        )
