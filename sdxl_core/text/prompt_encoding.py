"""Prompt → SDXL conditioning (context and pooled vector), the way ComfyUI's CLIPTextEncodeSDXL computes it.

ComfyUI `comfy/sd1_clip.py` (`SDTokenizer.tokenize_with_weights`, `ClipTokenWeightEncoder.encode_token_weights`),
`comfy/sdxl_clip.py` and `comfy_extras/nodes_clip_sdxl.py`, checked at Comfy-Org/ComfyUI a125cd84 (2025-10):

- Chunking: each weighted segment of the prompt is tokenized as one group; groups are packed into chunks of
  [BOS] + up to 75 tokens + [EOS], padded to 77. A group that no longer fits moves whole to the next chunk, unless it
  has 8 or more tokens: then it is split at the chunk boundary. (Since 2024-12 ComfyUI tokenizes whole segments, not
  space-separated words.)
- Textual inversion (`embedding:name`, see `embeddings`): a segment is cut before each embedding; the text before
  it, the embedding's vectors (one position each, with the segment's weight) and the text after its name are
  separate groups, packed by the same rule, so an embedding of 8 or more vectors may straddle two chunks and a
  shorter one moves whole. Each encoder takes its own tensor (`clip_l` / `clip_g`) of its own width; a missing
  embedding, or one without that tensor, is an error (ComfyUI logs a warning and drops it).
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

from .embeddings import EMBEDDING_PREFIX, EmbeddingError, EmbeddingLibrary, split_embedding_words
from .encoders import TextEncoder
from .prompt_weighting import parse_prompt_weights
from .tokenizer import ClipTokenizer, SDXLTokenizer

EMPTY_PROMPT_MODES = ("encode", "zeros")
# Groups at least this long may be split across chunks (ComfyUI `SDTokenizer.max_word_length`).
SPLITTABLE_GROUP_LENGTH = 8
# Token id left at positions that an embedding vector fills: any id but EOS, where the pooled output is read.
EMBEDDING_PLACEHOLDER_ID = 0


@dataclass(frozen=True)
class WeightedTokens:
    """Chunked token ids and their per-token weights, both [chunks, 77], and any textual-inversion vectors."""

    tokens: torch.Tensor  # int64; EMBEDDING_PLACEHOLDER_ID where a vector goes
    weights: torch.Tensor  # float32; 1.0 for BOS/EOS/pad
    vectors: torch.Tensor | None = None  # float32 [chunks, 77, width]; zero where no vector goes
    vector_mask: torch.Tensor | None = None  # bool [chunks, 77]: positions taken by `vectors`

    @property
    def num_chunks(self) -> int:
        return self.tokens.shape[0]


def tokenize_weighted(tokenizer: ClipTokenizer, text: str, embeddings=None, *,
                      embedding_width: int | None = None) -> WeightedTokens:
    """Weighted, chunked tokens of a prompt, `embedding:name` vectors in place (ComfyUI
    `SDTokenizer.tokenize_with_weights`).

    `embeddings`: a folder, a list of folders, a mapping name → tensors, or an `EmbeddingLibrary`; needed only when
    the prompt names an embedding. `embedding_width` is the encoder's width, which the vectors must have.
    """
    library = EmbeddingLibrary.from_source(embeddings)
    length = tokenizer.context_length
    room = length - 1  # a chunk's tokens before its EOS, BOS included
    chunks: list[list[tuple[int | torch.Tensor, float]]] = [[(tokenizer.bos_token_id, 1.0)]]
    for group, weight in _groups(tokenizer, text, library, embedding_width):
        group = [(item, weight) for item in group]
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
    tokens = torch.tensor([[EMBEDDING_PLACEHOLDER_ID if isinstance(t, torch.Tensor) else t for t, _ in c]
                           for c in chunks], dtype=torch.long)
    weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32)
    mask = torch.tensor([[isinstance(t, torch.Tensor) for t, _ in c] for c in chunks], dtype=torch.bool)
    if not mask.any():
        return WeightedTokens(tokens=tokens, weights=weights)
    vectors = torch.zeros(*tokens.shape, embedding_width)
    for c, chunk in enumerate(chunks):
        for position, (item, _) in enumerate(chunk):
            if isinstance(item, torch.Tensor):
                vectors[c, position] = item
    return WeightedTokens(tokens=tokens, weights=weights, vectors=vectors, vector_mask=mask)


def _groups(tokenizer: ClipTokenizer, text: str, library: EmbeddingLibrary | None,
            width: int | None) -> list[tuple[list[int | torch.Tensor], float]]:
    """The prompt's token groups with their weights: each segment's text between embeddings, and each embedding's
    vectors (rows of [n, width]) as a group of its own (ComfyUI `tokenize_with_weights`' word loop)."""
    groups = []
    for segment, weight in parse_prompt_weights(text):
        for word in split_embedding_words(segment):
            if word.startswith(EMBEDDING_PREFIX):
                vectors, word = _embedding(tokenizer, word[len(EMBEDDING_PREFIX):], library, width)
                groups.append((list(vectors.unbind(0)), weight))
                if not word:
                    continue
            groups.append((tokenizer.encode(word), weight))
    return groups


def _embedding(tokenizer: ClipTokenizer, reference: str, library: EmbeddingLibrary | None,
               width: int | None) -> tuple[torch.Tensor, str]:
    if library is None:
        name = reference.split()[0] if reference.split() else ""
        raise EmbeddingError(f"the prompt names {EMBEDDING_PREFIX}{name}, but no embedding source was given (pass "
                             "embeddings=a folder, a list of folders or a mapping name → tensors; on the command "
                             "line, --embeddings DIR)")
    if tokenizer.embedding_key is None or width is None:
        raise ValueError("the prompt names an embedding: give the tokenizer an embedding_key (e.g. 'clip_g') and "
                         "tokenize_weighted the encoder's embedding_width")
    return library.resolve(reference, tokenizer.embedding_key, width)


def pad_chunks(weighted: WeightedTokens, tokenizer: ClipTokenizer, num_chunks: int) -> WeightedTokens:
    """Append empty chunks up to `num_chunks` (ComfyUI CLIPTextEncodeSDXL evening out the L and G token lists)."""
    missing = num_chunks - weighted.num_chunks
    if missing <= 0:
        return weighted
    empty = torch.tensor([tokenizer.empty_chunk()], dtype=torch.long).expand(missing, -1)
    vectors = mask = None
    if weighted.vectors is not None:
        vectors = torch.cat([weighted.vectors, weighted.vectors.new_zeros(missing, *weighted.vectors.shape[1:])])
        mask = torch.cat([weighted.vector_mask, torch.zeros(empty.shape, dtype=torch.bool)])
    return WeightedTokens(tokens=torch.cat([weighted.tokens, empty]),
                          weights=torch.cat([weighted.weights, torch.ones(empty.shape)]), vectors=vectors,
                          vector_mask=mask)


@torch.no_grad()
def encode_weighted_tokens(encoder: TextEncoder, tokenizer: ClipTokenizer,
                           weighted: WeightedTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context [1, 77 k, width] and first-chunk pooled output (ComfyUI `encode_token_weights`)."""
    has_weights = bool((weighted.weights != 1.0).any())
    tokens, vectors, mask = weighted.tokens, weighted.vectors, weighted.vector_mask
    if has_weights:
        tokens = torch.cat([tokens, torch.tensor([tokenizer.empty_chunk()], dtype=torch.long)])
        if vectors is not None:
            vectors = torch.cat([vectors, vectors.new_zeros(1, *vectors.shape[1:])])
            mask = torch.cat([mask, mask.new_zeros(1, mask.shape[1])])
    hidden, pooled = encoder(tokens, vectors, mask)
    hidden = hidden.float()
    z = hidden[:weighted.num_chunks]
    if has_weights:
        z_empty = hidden[-1:]
        w = weighted.weights.to(z.device)[..., None]
        z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
    context = z.reshape(1, -1, z.shape[-1])
    return context, (pooled[:1].float() if pooled is not None else None)


def encode_base_prompt(clip_l: TextEncoder, clip_g: TextEncoder, text_l: str, text_g: str | None = None, *,
                       tokenizer: SDXLTokenizer | None = None, empty_prompt: str = "encode",
                       embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL base conditioning: context [1, 77 k, L+G width] and bigG pooled [1, 1280] (ComfyUI CLIPTextEncodeSDXL).

    `text_g` defaults to `text_l` (one prompt for both encoders). `embeddings` (a folder, list of folders, mapping
    name → tensors or `EmbeddingLibrary`) is where `embedding:name` is looked up; CLIP-L takes `clip_l`, bigG `clip_g`.
    """
    _check_encoder(clip_l, "clip_l", pooled=False)
    _check_encoder(clip_g, "clip_g", pooled=True)
    text_g = text_l if text_g is None else text_g
    tokenizer = tokenizer or SDXLTokenizer()
    if _is_zeroed(empty_prompt, text_l, text_g):
        width = clip_l.config.hidden_size + clip_g.config.hidden_size
        return _zeros(clip_g, width)
    library = EmbeddingLibrary.from_source(embeddings)  # one library: each file is read once for both encoders
    tokens_l = tokenize_weighted(tokenizer.clip_l, text_l, library, embedding_width=clip_l.config.hidden_size)
    tokens_g = tokenize_weighted(tokenizer.clip_g, text_g, library, embedding_width=clip_g.config.hidden_size)
    chunks = max(tokens_l.num_chunks, tokens_g.num_chunks)
    context_l, _ = encode_weighted_tokens(clip_l, tokenizer.clip_l, pad_chunks(tokens_l, tokenizer.clip_l, chunks))
    context_g, pooled = encode_weighted_tokens(clip_g, tokenizer.clip_g,
                                               pad_chunks(tokens_g, tokenizer.clip_g, chunks))
    return torch.cat([context_l, context_g.to(context_l.device)], dim=-1), pooled


def encode_refiner_prompt(clip_g: TextEncoder, text: str, *, tokenizer: SDXLTokenizer | None = None,
                          empty_prompt: str = "encode", embeddings=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL refiner conditioning: bigG context [1, 77 k, 1280] and pooled [1, 1280] (CLIPTextEncodeSDXLRefiner);
    embeddings contribute their `clip_g` tensor."""
    _check_encoder(clip_g, "clip_g", pooled=True)
    tokenizer = tokenizer or SDXLTokenizer()
    if _is_zeroed(empty_prompt, text):
        return _zeros(clip_g, clip_g.config.hidden_size)
    tokens = tokenize_weighted(tokenizer.clip_g, text, embeddings, embedding_width=clip_g.config.hidden_size)
    return encode_weighted_tokens(clip_g, tokenizer.clip_g, tokens)


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
