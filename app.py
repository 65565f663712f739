"""A web demo: drop in a pet photo, see both captions, the breed ranking and where the model looked.

    python app.py --demo                        # offline: tiny BLIP + synthetic pets (trains the demo adapter)
    python app.py                               # adapter in outputs/blip-lora-pets, on http://127.0.0.1:7860
    python app.py --adapter my-adapter --port 8080 --host 0.0.0.0

For one image, the zero-shot base model and the fine-tuned (LoRA) model side by side: the greedy
caption, the breed it names, the top 5 of the 37-breed likelihood ranking (softmax over the
templated captions' log-likelihoods, the ranking evaluate.py scores) and the decoder's
cross-attention for the breed word, or else the cat/dog word, drawn as explainability.py draws it.
Everything comes from model.py, inference.py and attention.py; this file is layout. Gradio runs offline:
no analytics, no share link, system fonts. Writes run_config.json and the example images to
--output_dir.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it must never call home

import base64
import binascii
import io
import logging
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import gradio as gr
import numpy as np
import torch
from gradio.utils import get_upload_folder as gradio_upload_folder
from PIL import Image

from attention import explain, overlay
from config import DEMO_APP_OVERRIDES, AppConfig, PetConfig, check_seed, parse_config
from data import BadImage, Record, load_image, load_run_splits
from demo import use_demo_assets
from devices import pick_device, pick_dtype
from inference import embeddings_per_model, label_candidates, rank_labels
from labels import OXFORD_PETS, UNKNOWN, LabelSet
from metrics import MODELS
from model import load_model_pair
from run_io import UserError, check_output_dir, inside, is_local, run_main, setup_logging
from run_record import AdapterRun, save_run_config

logger = logging.getLogger("app")

TITLES = dict(zip(MODELS, ("Zero-shot BLIP", "Fine-tuned (LoRA)")))  # a column per model
TOP_K = 5
DISPLAY_SIDE = (
    448  # maps are drawn on a copy this size: a 12 MP photo is slow to colour and send, a 64 px one too small to see
)
MAX_UPLOAD_BYTES = 50 << 20  # the pixel limit is data.load_image's, as everywhere in the project
EMPTY_MESSAGE = "No image: upload or paste one, or pick an example below."
NOT_AN_IMAGE = "That file is not an image this app can read. Try a JPEG, PNG or WebP photo."
MAP_LABEL = "Cross-attention"


# The bars are the summed ranking, which evaluate.py scores (likelihood_top1) and which agrees with the fine-tuned
# demo's captions (metrics.json: ranking_agrees_with_caption); the per-token one is named where it differs
def ranking_title(labels: LabelSet) -> str:
    return f"Top {TOP_K} of {len(labels)} {labels.plural} (softmax of summed caption log-likelihoods)"


def empty_result(labels: LabelSet) -> list:
    """One model's fields after an error: no caption, no class, no bars or map (their titles kept)."""
    return [None, None, gr.update(value=None, label=ranking_title(labels)), gr.update(value=None, label=MAP_LABEL)]


RANKING_LABEL = ranking_title(OXFORD_PETS)  # the pets page's
EMPTY_RESULT = empty_result(OXFORD_PETS)


@dataclass(frozen=True)
class Refused:
    """An input refused before anything opened it; read_image turns it into the page's message."""

    message: str


URL_MESSAGE = "Images are taken as uploads only, not as links: download it and upload the file."
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, ftp://, file://...
REFUSED_URL = "<a URL, refused>"  # the path Gradio is handed instead of fetching a URL: no file has it


def image_input(**kwargs) -> gr.Image:
    """gr.Image whose callbacks get an upload unopened, and whose requests Gradio never opens or fetches.

    Gradio would fetch a file path that is a URL (looking the host name up first), decode a data:
    URL in full before the callback runs, open every upload with PIL, and take the path of a file
    object sent without its "meta" field as it is, whatever server file it names. Here a URL is
    refused before Gradio's fetch, only files in Gradio's upload folder and data: URLs (as bytes)
    reach the callback, and data.load_image judges them: it reads the size from the header and
    applies the project's pixel limit before decoding. (Instance attributes, not a subclass:
    Gradio writes a .pyi stub next to the source of every Component subclass.)
    """
    image = gr.Image(type="filepath", **kwargs)
    move, async_move = image.move_resource_to_block_cache, image.async_move_resource_to_block_cache

    def guarded_move(url_or_file_path):
        return REFUSED_URL if _is_url(url_or_file_path) else move(url_or_file_path)

    async def guarded_async_move(url_or_file_path):  # what a request's files go through, before any fetch
        return REFUSED_URL if _is_url(url_or_file_path) else await async_move(url_or_file_path)

    image.move_resource_to_block_cache, image.async_move_resource_to_block_cache = guarded_move, guarded_async_move
    image.preprocess = lambda payload: None if payload is None else request_image(payload.path, payload.url)
    return image


def _is_url(path) -> bool:
    return isinstance(path, str) and URL_SCHEME.match(path) is not None


def request_image(path: Optional[str], url: Optional[str]):
    """What a request's image becomes for the callback: a file path in Gradio's upload folder, a data:
    URL's bytes, or Refused; nothing is opened here."""
    if url and url.startswith("data:"):
        return _data_url_bytes(url)
    if path == REFUSED_URL or _is_url(path) or _is_url(url):
        return Refused(URL_MESSAGE)
    if not path or not inside(path, gradio_upload_folder()):
        return Refused("That file was not uploaded here: upload the image, paste it, or pick an example below.")
    return path


def _data_url_bytes(url: str):
    """The bytes of a base64 data: URL as a file object (not decoded as an image), or Refused."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        return Refused(NOT_AN_IMAGE)
    if len(payload) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        return Refused(f"That file is larger than the {MAX_UPLOAD_BYTES >> 20} MB this app accepts.")
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except binascii.Error:
        return Refused(NOT_AN_IMAGE)


def parse_args(argv=None):
    cfg, args = parse_config((PetConfig, AppConfig), argv, DEMO_APP_OVERRIDES)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535 (0 picks a free port), not {args.port}")
    if args.num_examples < 0:
        raise UserError("--num_examples must be 0 or more")
    check_output_dir(args.output_dir, args.adapter)
    check_seed(args.seed)
    # the demo trains its adapter first when it is missing (main): no record to read yet
    missing = cfg.demo and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json"))
    adapter_run = None if missing else AdapterRun.read(args.adapter)
    if cfg.demo:  # after every option check (use_demo_assets may pre-train the base)
        use_demo_assets(cfg, adapter_run)
    if adapter_run is not None:
        # The same rule as evaluate.py and explainability.py: the flags if given, else the adapter's own base and data
        adapter_run.fill(cfg)
    return cfg, args, adapter_run


def read_image(image) -> Image.Image:
    """RGB image from an upload (a file path, bytes in a file object, a PIL image), or a UserError the page shows."""
    if image is None or (isinstance(image, str) and not image):
        raise UserError(EMPTY_MESSAGE)
    if isinstance(image, Refused):
        raise UserError(image.message)
    try:
        return load_image(Record("upload", -1, image))
    except BadImage as e:
        if "DecompressionBomb" in str(e):
            raise UserError(
                f"That image is too large: the limit is {Image.MAX_IMAGE_PIXELS:,} pixels, as for every "
                "image in this project. Shrink it and try again."
            ) from e
        raise UserError(NOT_AN_IMAGE) from e


class PetCaptioner:
    """Both models, loaded once; analyse() answers one image."""

    def __init__(self, cfg, args, adapter_run):
        self.cfg, self.device = cfg, pick_device()
        self.dtype = pick_dtype(self.device, cfg.precision)
        self.base_name = cfg.model_name_or_path
        pair = load_model_pair(
            self.base_name,
            args.adapter,
            self.device,
            self.dtype,
            adapter_run.adapter_config,
            adapter_run.base_fingerprint,
        )
        self.processor, self.models, self.shared = pair.processor, pair.models, pair.shared_vision
        self.labels = adapter_run.labels or OXFORD_PETS  # adapters of runs that did not record it are pets
        self.template = cfg.caption_template or self.labels.default_template()
        self.labels.check_template(self.template)
        self.candidates = label_candidates(pair.zero_shot, self.processor.tokenizer, self.labels, self.template)
        self.candidate_tokens = self.candidates[1][:, 1:].sum(-1)  # tokens scored per class, [SEP] included

    @torch.no_grad()
    def analyse(self, image) -> dict:
        """{"zero_shot": {...}, "fine_tuned": {...}} for one image; UserError for bad input."""
        image = read_image(image)
        pixels = self.processor.image_processor([image], return_tensors="pt")["pixel_values"].to(
            self.device, self.dtype
        )
        scale = DISPLAY_SIDE / max(image.size)
        shown = np.asarray(
            image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
            )
        )
        out, embeds_of = {}, embeddings_per_model(self.models, pixels, self.shared)
        for key, model in self.models.items():
            embeds = embeds_of[key]
            explained = explain(model, self.processor, embeds, self.cfg, None, self.labels)[0]
            scores, order = rank_labels(model, embeds, self.candidates)
            probs = torch.softmax(scores[0].float(), dim=-1)
            per_token_first = int(torch.argmax(scores[0].float() / self.candidate_tokens))
            named = self.labels.from_caption(explained["caption"])
            subject = explained["subject_map"]
            out[key] = {
                "caption": explained["caption"],
                "breed": self.labels.names[named] if named != UNKNOWN else None,
                "top": [(self.labels.names[i], float(probs[i])) for i in order[0, :TOP_K].tolist()],
                "scores": scores[0].float().cpu().numpy(),
                # the per-token (length-normalised) ranking's first breed, when it is not the summed ranking's
                "per_token_first": self.labels.names[per_token_first] if per_token_first != int(order[0, 0]) else None,
                "map_word": explained["panels"][0][0] if subject is not None else None,  # "breed: pug", "animal: dog"
                "heatmap": overlay(shown, subject) if subject is not None else shown,
            }
        return out


def handle(captioner: PetCaptioner, image) -> list:
    """Gradio's callback: the status line, then caption, breed, top 5 and map for each model.

    Bad input is a message in the status line and empty fields, never a Gradio error.
    """
    start = time.perf_counter()
    try:
        result = captioner.analyse(image)
    except UserError as e:
        return [f"**error:** {e}"] + empty_result(captioner.labels) * len(MODELS)
    except Exception:  # a bug: the log gets the traceback, the page one line
        logger.exception("request failed")
        return ["**error:** something went wrong on the server (see its log)."] + empty_result(captioner.labels) * len(
            MODELS
        )
    seconds = time.perf_counter() - start
    logger.info("answered in %.3f s: %s", seconds, {k: r["caption"] for k, r in result.items()})
    values = [
        f"Answered in {seconds:.2f} s on {captioner.device.type}"
        f"{' (image embedded once for both models)' if captioner.shared else ''}."
    ]
    for key in MODELS:
        r = result[key]
        values += [
            r["caption"],
            r["breed"] or f"no {captioner.labels.kind} named",
            gr.update(value=dict(r["top"]), label=ranking_label(r, captioner.labels)),
            gr.update(
                value=r["heatmap"],
                label=f"Cross-attention of “{r['map_word'].split(': ', 1)[1]}”"
                if r["map_word"]
                else nothing_to_map(captioner.labels),
            ),
        ]
    return values


def ranking_label(result: dict, labels: LabelSet) -> str:
    first, title = result["per_token_first"], ranking_title(labels)
    return title if first is None else f"{title}; per token, {first} would come first"


def nothing_to_map(labels: LabelSet) -> str:
    return "No breed or cat/dog word to map" if labels.is_pets else f"No {labels.kind} word to map"


def example_folder(args) -> str:
    """Where the example images are written: the only folder the app lets Gradio serve files from."""
    return os.path.abspath(os.path.join(args.output_dir, "examples"))


def write_examples(cfg, args, labels: LabelSet = OXFORD_PETS) -> list:
    """[(PNG path, true breed)] of test images of the data set, one per breed (seeded), saved in example_folder.

    The file names come from a safe form of each image id, never the id itself: ids are data, and one like
    "../../x" or "cats/1" would otherwise name a file outside the folder or in a folder that does not exist.
    """
    if args.num_examples == 0:
        return []
    try:
        records = load_run_splits(cfg, cfg.val_fraction, args.seed, labels).test
    except UserError as e:  # the app works without examples (e.g. offline with a Hub data set)
        logger.warning("no example images: %s", e)
        return []
    random.Random(args.seed).shuffle(records)
    one_per_breed = {}
    for r in records:
        one_per_breed.setdefault(r.label, r)
    folder = example_folder(args)
    os.makedirs(folder, exist_ok=True)
    examples = []
    for k, r in enumerate(list(one_per_breed.values())[: args.num_examples]):
        try:
            image = load_image(r)
        except BadImage:
            continue
        path = os.path.join(folder, f"{k:02d}_{safe_file_name(r.image_id)}.png")
        image.save(path)
        examples.append((path, labels.names[r.label]))
    return examples


def safe_file_name(text: str, limit: int = 60) -> str:
    """Letters, digits, '-' and '_' of `text` (others as '_'), at most `limit` of them: a name, never a path."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:limit] or "image"


def shown_name(name_or_path: str) -> str:
    """How the page names a model: a Hub id as it is, a local folder by its own name (never a server path)."""
    return os.path.basename(os.path.normpath(name_or_path)) if is_local(name_or_path) else name_or_path


def build_ui(captioner: PetCaptioner, examples: list) -> gr.Blocks:
    labels = captioner.labels
    pets = labels.is_pets
    with gr.Blocks(title="BLIP + LoRA pet captions" if pets else f"BLIP + LoRA: which {labels.kind}?") as demo:
        trained_on = "Oxford-IIIT Pet" if pets else f"{len(labels)} {labels.plural}"
        gr.Markdown(
            f"# Which {labels.kind} is it?\nBLIP captions {'a pet photo' if pets else 'an image'} before and after "
            f"LoRA fine-tuning on {trained_on}. Zero-shot: `{shown_name(captioner.base_name)}`."
        )
        with gr.Row():
            image = image_input(
                sources=["upload", "clipboard"],
                label="Pet photo" if pets else "Image",
                elem_id="input-image",
                height=320,
            )
            with gr.Column():
                submit = gr.Button("Caption it", variant="primary", elem_id="submit")
                status = gr.Markdown(elem_id="status")
        outputs = [status]
        with gr.Row():
            for key, title in TITLES.items():
                with gr.Column(elem_id=key):
                    gr.Markdown(f"## {title}")
                    outputs += [
                        gr.Textbox(label="Caption", interactive=False, elem_id=f"{key}-caption"),
                        gr.Textbox(label=f"{labels.kind.title()} named", interactive=False, elem_id=f"{key}-breed"),
                        gr.Label(
                            label=ranking_title(labels), num_top_classes=TOP_K, show_heading=False, elem_id=f"{key}-top"
                        ),
                        gr.Image(label=MAP_LABEL, interactive=False, elem_id=f"{key}-map", height=320),
                    ]
        fn = lambda img: handle(captioner, img)  # noqa: E731
        submit.click(fn, inputs=image, outputs=outputs, api_name="caption")
        if examples:
            gr.Examples(
                [[p] for p, _ in examples],
                inputs=image,
                outputs=outputs,
                fn=fn,
                run_on_click=True,
                cache_examples=False,
                example_labels=[b for _, b in examples],
                label="Examples from the data set",
            )
    return demo


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv=None):
    setup_logging()
    cfg, args, adapter_run = parse_args(argv)
    if adapter_run is None:
        # A fresh clone has no demo adapter yet: train it (about a minute on a CPU), then serve it
        logger.info("no demo adapter in %s: training one with `train.py --demo` first", args.adapter)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        if subprocess.run([sys.executable, script, "--demo", "--output_dir", args.adapter]).returncode != 0:
            raise UserError(
                f"training the demo adapter failed (see above); run `python train.py --demo --output_dir "
                f"{args.adapter}` to see why, then start the app again"
            )
        adapter_run = AdapterRun.read(args.adapter)
        adapter_run.fill(cfg)
    if cfg.demo and pick_device().type == "cpu":
        # The tiny model's matrices are too small to split between threads: on a busy CPU the threads
        # would mostly wait for each other
        torch.set_num_threads(1)
    captioner = PetCaptioner(cfg, args, adapter_run)
    examples = write_examples(cfg, args, captioner.labels)
    save_run_config(os.path.join(args.output_dir, "run_config.json"), shared=cfg, app=args)
    port = args.port or free_port(args.host)
    print(f"Serving on http://{args.host}:{port} (Ctrl+C stops)", flush=True)
    # System fonts: the default theme's web fonts would be one more thing to fetch
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    build_ui(captioner, examples).launch(
        server_name=args.host,
        server_port=port,
        share=False,
        theme=theme,
        ssr_mode=False,
        max_file_size=MAX_UPLOAD_BYTES,
        allowed_paths=[example_folder(args)] if examples else [],
        quiet=True,
    )


if __name__ == "__main__":
    run_main(main)
