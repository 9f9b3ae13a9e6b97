"""Prompt → SDXL conditioning (context and pooled vector), the way ComfyUI's CLIPTextEncodeSDXL computes it.

ComfyUI `comfy/sd1_clip.py` (`SDTokenizer.tokenize_with_weights`, `ClipTokenWeightEncoder.encode_token_weights`),
`comfy/sdxl_clip.py` and `comfy_extras/nodes_clip_sdxl.py`, checked at Comfy-Org/ComfyUI a125cd84 (2025-10):

- Chunking: each weighted segment of the prompt is tokenized as one group; groups are packed into chunks of
  [BOS] + up to 75 tokens + [EOS], padded to 77. A group that no longer fits moves whole to the next chunk, unless it
  has 8 or more tokens: then it is split at the chunk boundary. (Since 2024-12 ComfyUI tokenizes whole segments, not
  space-separated words; textual-inversion `embedding:` names are not supported here and are ordinary text.)
- Weighting: only if some token's weight differs from 1, the empty prompt (BOS, EOS, pads) is encoded as well and
  every weighted token's hidden state becomes z_empty + (z - z_empty) * w, position by position.
- Chunks are encoded as one batch and concatenated along the sequence: context [1, 77 k, width].
- Pooled: the first chunk's.
- SDXL: CLIP-L and bigG are tokenized separately (different pads); the one with fewer chunks gets empty chunks
  appended; the context is [L hidden | G hidden] along the channels.

The empty prompt: `empty_prompt="encode"` (default, ComfyUI: "" is encoded like any text) or `"zeros"` (sgm's
`force_uc_zero_embeddings=["txt"]` for the base model and diffusers' `force_zeros_for_empty_prompt`: a blank prompt
gives an all-zero context of one chunk AND an all-zero pooled vector).

Results are float32 (as ComfyUI returns them), on the text encoders' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt_weighting import parse_prompt_weights
from .text_encoders import TextEncoder
from .tokenizer import ClipTokenizer, SDXLTokenizer

EMPTY_PROMPT_MODES = ("encode", "zeros")
# Groups at least this long may be split across chunks (ComfyUI `SDTokenizer.max_word_length`).
SPLITTABLE_GROUP_LENGTH = 8


@dataclass(frozen=True)
class WeightedTokens:
    """Chunked token ids and their per-token weights, both [chunks, 77]."""

    tokens: torch.Tensor  # int64
    weights: torch.Tensor  # float32; 1.0 for BOS/EOS/pad

    @property
    def num_chunks(self) -> int:
        return self.tokens.shape[0]


def tokenize_weighted(tokenizer: ClipTokenizer, text: str) -> WeightedTokens:
    """Weighted, chunked tokens of a prompt (ComfyUI `SDTokenizer.tokenize_with_weights`)."""
    length = tokenizer.context_length
    room = length - 1  # a chunk's tokens before its EOS, BOS included
    chunks: list[list[tuple[int, float]]] = [[(tokenizer.bos_token_id, 1.0)]]
    for segment, weight in parse_prompt_weights(text):
        group = [(token, weight) for token in tokenizer.encode(segment)]
        splittable = len(group) >= SPLITTABLE_GROUP_LENGTH
        while group:
            chunk = chunks[-1]
            if len(chunk) + len(group) <= room:
                chunk += group
                break
            free = room - len(chunk)
            if splittable:
                chunk += group[:free]
                group = group[free:]
            chunk.append((tokenizer.eos_token_id, 1.0))
            chunk += [(tokenizer.pad_token_id, 1.0)] * (length - len(chunk))
            chunks.append([(tokenizer.bos_token_id, 1.0)])
    last = chunks[-1]
    last.append((tokenizer.eos_token_id, 1.0))
    last += [(tokenizer.pad_token_id, 1.0)] * (length - len(last))
    return WeightedTokens(tokens=torch.tensor([[t for t, _ in c] for c in chunks], dtype=torch.long),
                          weights=torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32))


def pad_chunks(weighted: WeightedTokens, tokenizer: ClipTokenizer, num_chunks: int) -> WeightedTokens:
    """Append empty chunks up to `num_chunks` (ComfyUI CLIPTextEncodeSDXL evening out the L and G token lists)."""
    missing = num_chunks - weighted.num_chunks
    if missing <= 0:
        return weighted
    empty = torch.tensor([tokenizer.empty_chunk()], dtype=torch.long).expand(missing, -1)
    return WeightedTokens(tokens=torch.cat([weighted.tokens, empty]),
                          weights=torch.cat([weighted.weights, torch.ones(empty.shape)]))


@torch.no_grad()
def encode_weighted_tokens(encoder: TextEncoder, tokenizer: ClipTokenizer,
                           weighted: WeightedTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context [1, 77 k, width] and first-chunk pooled output (ComfyUI `encode_token_weights`)."""
    has_weights = bool((weighted.weights != 1.0).any())
    tokens = weighted.tokens
    if has_weights:
        tokens = torch.cat([tokens, torch.tensor([tokenizer.empty_chunk()], dtype=torch.long)])
    hidden, pooled = encoder(tokens)
    hidden = hidden.float()
    z = hidden[:weighted.num_chunks]
    if has_weights:
        z_empty = hidden[-1:]
        w = weighted.weights.to(z.device)[..., None]
        z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
    context = z.reshape(1, -1, z.shape[-1])
    return context, (pooled[:1].float() if pooled is not None else None)


def encode_base_prompt(clip_l: TextEncoder, clip_g: TextEncoder, text_l: str, text_g: str | None = None, *,
                       tokenizer: SDXLTokenizer | None = None,
                       empty_prompt: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL base conditioning: context [1, 77 k, L+G width] and bigG pooled [1, 1280] (ComfyUI CLIPTextEncodeSDXL).

    `text_g` defaults to `text_l` (one prompt for both encoders).
    """
    _check_encoder(clip_l, "clip_l", pooled=False)
    _check_encoder(clip_g, "clip_g", pooled=True)
    text_g = text_l if text_g is None else text_g
    tokenizer = tokenizer or SDXLTokenizer()
    if _is_zeroed(empty_prompt, text_l, text_g):
        width = clip_l.config.hidden_size + clip_g.config.hidden_size
        return _zeros(clip_g, width)
    tokens_l = tokenize_weighted(tokenizer.clip_l, text_l)
    tokens_g = tokenize_weighted(tokenizer.clip_g, text_g)
    chunks = max(tokens_l.num_chunks, tokens_g.num_chunks)
    context_l, _ = encode_weighted_tokens(clip_l, tokenizer.clip_l, pad_chunks(tokens_l, tokenizer.clip_l, chunks))
    context_g, pooled = encode_weighted_tokens(clip_g, tokenizer.clip_g,
                                               pad_chunks(tokens_g, tokenizer.clip_g, chunks))
    return torch.cat([context_l, context_g.to(context_l.device)], dim=-1), pooled


def encode_refiner_prompt(clip_g: TextEncoder, text: str, *, tokenizer: SDXLTokenizer | None = None,
                          empty_prompt: str = "encode") -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL refiner conditioning: bigG context [1, 77 k, 1280] and pooled [1, 1280] (CLIPTextEncodeSDXLRefiner)."""
    _check_encoder(clip_g, "clip_g", pooled=True)
    tokenizer = tokenizer or SDXLTokenizer()
    if _is_zeroed(empty_prompt, text):
        return _zeros(clip_g, clip_g.config.hidden_size)
    return encode_weighted_tokens(clip_g, tokenizer.clip_g, tokenize_weighted(tokenizer.clip_g, text))


def _check_encoder(encoder: TextEncoder, name: str, *, pooled: bool) -> None:
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"{name} must be a TextEncoder, got {type(encoder).__name__}")
    if encoder.has_projection != pooled:
        expected = "bigG (with a pooled projection)" if pooled else "CLIP-L (without a projection)"
        raise ValueError(f"{name} must be the {expected} encoder; got one with projection_dim="
                         f"{encoder.config.projection_dim}")


def _is_zeroed(empty_prompt: str, *texts: str) -> bool:
    if empty_prompt not in EMPTY_PROMPT_MODES:
        raise ValueError(f"empty_prompt must be one of {EMPTY_PROMPT_MODES}, got {empty_prompt!r}")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    return empty_prompt == "zeros" and all(not text.strip() for text in texts)


def _zeros(clip_g: TextEncoder, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = clip_g.hf_model.get_input_embeddings().weight.device
    context = torch.zeros(1, clip_g.config.max_position_embeddings, width, device=device)
    pooled = torch.zeros(1, clip_g.config.projection_dim, device=device)
    return context, pooled
