"""Captions and class rankings from image embeddings.

Greedy decoding (a static KV cache, optionally replayed as a CUDA graph that checks itself), the
`generate` fallback for beam search, and the likelihood ranking of every class's templated caption.
"""

import logging
import math
from typing import Optional

import torch

from data import tokenize_captions
from devices import device_setting
from model import MAX_ERROR_CHARS
from run_io import first_line

logger = logging.getLogger(__name__)


@torch.no_grad()
def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden state (B, 1 + patches, hidden): what the decoder attends to."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def embeddings_per_model(models: dict, pixel_values: torch.Tensor, shared: bool) -> dict:
    """{model key: image embeddings of the batch}; the vision encoder runs once when the models share it."""
    first = next(iter(models.values())) if shared else None
    embeds = image_embeddings(first, pixel_values) if shared else None
    return {name: embeds if shared else image_embeddings(model, pixel_values) for name, model in models.items()}


def decoding_options(cfg) -> dict:
    """The caption-decoding options of a run (PetConfig): keyword arguments of captions_from_embeddings."""
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        repetition_penalty=cfg.repetition_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
    )


@torch.no_grad()
def greedy_caption_ids(
    model,
    image_embeds: torch.Tensor,
    max_new_tokens: int = 30,
    cuda_graph: Optional[bool] = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> torch.Tensor:
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
    has no bos token. repetition_penalty and no_repeat_ngram_size act as generate's logits
    processors of the same names do (StaticGreedyDecoder.adjust).
    """
    if cuda_graph is None:
        cuda_graph = image_embeds.device.type == "cuda"
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    graphed = cuda_graph and not graph_decoding.off
    ids = _decode(model, image_embeds, max_new_tokens, graphed=True, **rules) if graphed else None
    if ids is None:  # graphs off, or the capture failed
        return _decode(model, image_embeds, max_new_tokens, graphed=False, **rules)
    if not graph_decoding.passed:
        ids = graph_decoding.check(ids, _decode(model, image_embeds, max_new_tokens, graphed=False, **rules))
    return ids


def _decode(model, image_embeds: torch.Tensor, max_new_tokens: int, graphed: bool, **rules) -> Optional[torch.Tensor]:
    """The greedy loop, its step replayed as a CUDA graph or called plainly; None if the capture failed."""
    decoder = StaticGreedyDecoder(model, image_embeds, max_new_tokens, **rules)
    step = graphed_step(decoder.step, image_embeds.device) if graphed else decoder.step
    if step is None:
        return None
    # A host check of "every row has its [SEP]" waits for the device, so with a graph it is done
    # every few steps; the steps past the end only write padding, and are cut off below.
    check_every = device_setting("graph_check_every", image_embeds.device) if graphed else 1
    for t in range(max_new_tokens):
        step()
        if (t + 1) % check_every == 0 and bool(decoder.done.all()):
            break
    return decoder.ids[:, : 1 + int(decoder.steps)]


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
            logger.info(
                "self-check passed: CUDA-graph decoding gave the plain loop's ids on its first batch "
                "(%d rows x %d tokens)",
                *plain.shape,
            )
            return graphed
        row, index, got, want = where
        self.turn_off(
            f"its first batch differs from the plain loop at row {row}, token {index}: id {got} instead of {want}"
        )
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

    def __init__(
        self,
        model,
        image_embeds: torch.Tensor,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
    ):
        text_config = model.config.text_config
        decoder = model.text_decoder
        self.embeddings, self.layers, self.head = decoder.bert.embeddings, decoder.bert.encoder.layer, decoder.cls
        self.sep, self.pad = text_config.sep_token_id, text_config.pad_token_id
        batch, device = image_embeds.shape[0], image_embeds.device
        attn = self.layers[0].attention.self
        self.heads, self.head_size = attn.num_attention_heads, attn.attention_head_size
        self.scale = math.sqrt(self.head_size)
        # contiguous once here, or every step's matmul would copy them (577 x hidden per layer and image)
        self.cross = [
            (
                self._split(layer.crossattention.self.key(image_embeds)).contiguous(),
                self._split(layer.crossattention.self.value(image_embeds)).contiguous(),
            )
            for layer in self.layers
        ]
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
        self.penalty, self.ngram = repetition_penalty, no_repeat_ngram_size
        if self.penalty != 1.0:  # the tokens each row holds so far, the start token included (as generate sees them)
            self.seen = torch.zeros(batch, self.head.predictions.decoder.out_features, dtype=torch.bool, device=device)
            self.seen[:, text_config.bos_token_id] = True

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
        logits = self.adjust(self.head(x)[:, -1])
        token = logits.argmax(-1).masked_fill(self.done, self.pad)  # finished rows get padding, as in generate
        if self.penalty != 1.0:
            self.seen.scatter_(1, token.unsqueeze(1), True)
        self.steps += (~self.done).any().long()
        self.done |= token == self.sep
        self.ids.index_copy_(1, self.position + 1, token.unsqueeze(1))
        self.position += 1

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """generate's RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor, in fixed shapes.

        As generate does, the scores are float32 before either applies. Repetition penalty: a seen
        token's logit is divided by the penalty (multiplied where it is negative). No repeated n-gram:
        where the last n-1 tokens occurred before, the token that followed them then is banned.
        """
        if self.penalty == 1.0 and not self.ngram:
            return logits
        logits = logits.float()
        if self.penalty != 1.0:
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.ngram:
            n = self.ngram
            windows = self.ids.unfold(1, n, 1)  # (B, W, n): every n-gram slot of the buffer
            start = self.position + 2 - n  # where the last n-1 tokens (the one fed now included) begin
            suffix = self.ids.index_select(1, (start + torch.arange(n - 1, device=logits.device)).clamp(min=0))
            matched = (windows[..., : n - 1] == suffix.unsqueeze(1)).all(-1)
            # a slot counts when all its n tokens are known already, and only once n-1 tokens precede the next
            slots = torch.arange(windows.shape[1], device=logits.device)
            counted = matched & (slots <= self.position + 1 - n) & (start >= 0)
            banned = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
            banned.scatter_add_(1, windows[..., n - 1], counted.long())
            logits = logits.masked_fill(banned > 0, float("-inf"))
        return logits


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
    advanced += (state.seen,) if state.penalty != 1.0 else ()
    saved = [t.clone() for t in advanced]
    autocast = torch.autocast(
        device.type,
        dtype=torch.get_autocast_dtype(device.type),
        enabled=torch.is_autocast_enabled(device.type),
        cache_enabled=False,
    )
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
        graph_decoding.turn_off(f"capture failed: {first_line(e)[:MAX_ERROR_CHARS]}")
        if torch.cuda.is_available():
            torch.cuda.synchronize(device)
        return None
    for tensor, value in zip(advanced, saved):
        tensor.copy_(value)
    return graph.replay


@torch.no_grad()
def caption_ids_from_embeddings(
    model,
    image_embeds: torch.Tensor,
    max_new_tokens: int = 30,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
):
    """Generated token ids (B, T), starting with bos [DEC], and a mask that ends after the first [SEP]."""
    text_config = model.config.text_config
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    if num_beams == 1:
        ids = greedy_caption_ids(model, image_embeds, max_new_tokens, **rules)
    else:
        ids = generate_ids(model, image_embeds, max_new_tokens, num_beams, **rules)
    # Keep everything up to and including the first [SEP]; batch padding after it is masked out
    is_sep = (ids == text_config.sep_token_id).long()
    after_sep = (is_sep.cumsum(1) - is_sep) > 0
    return ids, (~after_sep).long()


def generate_ids(model, image_embeds: torch.Tensor, max_new_tokens: int, num_beams: int, **rules) -> torch.Tensor:
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
        **rules,
    )


@torch.no_grad()
def captions_from_embeddings(
    model, processor, image_embeds: torch.Tensor, max_new_tokens: int = 30, num_beams: int = 1, **rules
) -> list:
    """Greedy (or beam) captions from precomputed image embeddings, as BLIP's generate does them."""
    ids, _ = caption_ids_from_embeddings(model, image_embeds, max_new_tokens, num_beams, **rules)
    return [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]


# Candidates packed into one decoder sequence: a pass's attention grows with the square of its length, so
# more classes than this go through in several passes and the cost per image stays linear in the classes
CANDIDATES_PER_PASS = 64


@torch.no_grad()
def caption_log_likelihoods(
    model,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_rows: int = 128,
    candidates_per_pass: int = CANDIDATES_PER_PASS,
) -> torch.Tensor:
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
    C times. More than candidates_per_pass candidates are scored in groups of that many (one
    packed sequence each); at most max_rows // (candidates in a group) images go through the
    decoder at a time, so memory does not grow with the number of classes.
    """
    num_candidates = input_ids.shape[0]
    if num_candidates > candidates_per_pass:
        groups = range(0, num_candidates, candidates_per_pass)
        return torch.cat(
            [
                caption_log_likelihoods(
                    model,
                    image_embeds,
                    input_ids[g : g + candidates_per_pass],
                    attention_mask[g : g + candidates_per_pass],
                    max_rows,
                    candidates_per_pass,
                )
                for g in groups
            ],
            dim=1,
        )
    device = image_embeds.device
    packed = pack_candidates(input_ids, attention_mask)
    ids, positions, segments = (packed[k].to(device) for k in ("input_ids", "position_ids", "segments"))
    # row i may see row j: j is not later in its caption, and j is shared or of i's own candidate
    allowed = (positions[None, :] <= positions[:, None]) & (
        (segments[None, :] < 0) | (segments[None, :] == segments[:, None])
    )
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
        emb = image_embeds[start : start + per_chunk]
        n = emb.shape[0]
        hidden = model.text_decoder.bert(
            input_ids=ids.expand(n, -1),
            position_ids=positions.expand(n, -1),
            attention_mask=mask.expand(n, 1, -1, -1),
            encoder_hidden_states=emb,
            is_decoder=True,
            use_cache=False,
        ).last_hidden_state
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
        targets += r[shared + 1 :]
    long = dict(dtype=torch.long)
    return {
        "input_ids": torch.tensor(ids, **long),
        "position_ids": torch.tensor(positions, **long),
        "segments": torch.tensor(segments, **long),
        "targets": torch.tensor(targets, **long),
        "last_shared": shared - 1,
        "first_targets": torch.tensor([r[shared] for r in rows], **long),
    }


def label_candidates(model, tokenizer, labels, template: str):
    """The templated caption of every class of `labels`, tokenised for rank_labels; start id from `model`'s config."""
    captions = [labels.caption(c, template) for c in range(len(labels))]
    return tokenize_captions(tokenizer, captions, model.config.text_config.bos_token_id)


@torch.no_grad()
def rank_labels(model, image_embeds: torch.Tensor, candidates, max_rows: Optional[int] = None) -> tuple:
    """(scores (B, K), order (B, K)): caption log-likelihood of each class, and the classes best first.

    max_rows: candidate rows per decoder pass; default: the device's ranking_rows (devices.py).
    """
    if max_rows is None:
        max_rows = device_setting("ranking_rows", image_embeds.device)
    scores = caption_log_likelihoods(model, image_embeds, *candidates, max_rows=max_rows)
    return scores, torch.sort(scores, dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def evaluate_batch(models: dict, processor, pixels: torch.Tensor, candidates, cfg, share_embeddings: bool) -> dict:
    """Captions and class likelihood scores of one batch of images (pixel values) under each model.

    The vision encoder runs once per batch when the models share it (LoRA on the text decoder only).
    """
    first = next(iter(models.values()))
    param = next(first.parameters())
    pixels = pixels.to(param.device, param.dtype, non_blocking=True)
    embeds_of = embeddings_per_model(models, pixels, share_embeddings)
    out = {}
    for name, model in models.items():
        embeds = embeds_of[name]
        captions = captions_from_embeddings(model, processor, embeds, **decoding_options(cfg))
        scores, _ = rank_labels(model, embeds, candidates)
        out[name] = {"captions": captions, "scores": scores.cpu().numpy()}
    return out
