"""CLIP BPE tokenizers for SDXL's two text encoders, built offline from the bundled OpenAI vocabulary.

The vocabulary is derived from `data/bpe_simple_vocab_16e6.txt.gz` exactly as OpenAI CLIP's `simple_tokenizer.py`
derives it (256 byte symbols, the same with `</w>`, the first 48,894 merges, then the two special tokens: 49,408 ids);
the BPE itself runs in HF `tokenizers`, configured as transformers' (fast) `CLIPTokenizer` configures it, so the
text normalisation is the one diffusers and ComfyUI get from transformers 5: NFC, whitespace runs to one space,
lower-case. OpenAI's tokenizer additionally runs `ftfy.fix_text` and `html.unescape`; for text that those leave
unchanged (anything without mojibake or HTML entities) the ids are identical.

Padding differs between the encoders and matters for the outputs (the pad tokens are attended to):
CLIP-L pads with EOS 49407 (HF tokenizer of openai/clip-vit-large-patch14), bigG pads with 0 (`open_clip.tokenize`).
A literal "!" is token 256 for both: diffusers' `tokenizer_2` registers "!" as its pad *string* and so turns a typed
"!" into id 0 (diffusers #4153); ComfyUI and sgm do not, and neither do we.

Each tokenizer also names the key its encoder reads from SDXL textual-inversion files (`clip_l` / `clip_g`, ComfyUI's
`embedding_key`); `embedding:` references themselves are resolved by `prompt_encoding` through `embeddings`.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

from ..config import CLIP_CONTEXT_LENGTH

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>
CLIP_VOCAB_SIZE = 49408
# Merges used by CLIP: the file holds more; OpenAI keeps 49152 - 256 - 2 of them (vocab = bytes x2 + merges + 2).
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """The reversible byte → printable-unicode table of GPT-2 / OpenAI CLIP, in byte order of the vocabulary."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    # Printable bytes stand for themselves; the others are shifted past 255 in byte order. The vocabulary lists the
    # symbols in this insertion order (printable first), not in byte order.
    unprintable = [byte for byte in range(256) if byte not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(unprintable))]


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merge list of OpenAI CLIP (`simple_tokenizer.SimpleTokenizer.__init__`)."""
    raw = (Path(__file__).parents[1] / "data" / _VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is the "#version" header.
    merges = tuple(tuple(line.split()) for line in lines[1:1 + _NUM_MERGES])
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{_VOCAB_FILE} is damaged: expected {_NUM_MERGES} two-symbol merge lines")
    symbols = _bytes_to_unicode()
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {word: index for index, word in enumerate(words)}
    if len(vocab) != CLIP_VOCAB_SIZE or vocab["<|endoftext|>"] != EOS_TOKEN_ID:
        raise ValueError(f"{_VOCAB_FILE} gives {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


# OpenAI CLIP's pre-tokenisation pattern (`simple_tokenizer.py`); input is lower-cased before it applies.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=1)
def _bpe_backend():
    """One shared HF `tokenizers` BPE over the bundled vocabulary, set up as transformers' CLIPTokenizer sets it up.

    Built directly on `tokenizers` (a transformers dependency in every version) rather than through a transformers
    tokenizer class, whose constructor arguments changed between transformers 4 and 5.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = clip_vocabulary()
    backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # Typed special-token strings map to their ids, as in OpenAI's tokenizer and transformers.
    backend.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return backend


@dataclass(frozen=True)
class ClipTokenizer:
    """CLIP BPE with one encoder's special tokens: [BOS] + text + [EOS], padded to `context_length`."""

    pad_token_id: int
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    context_length: int = CLIP_CONTEXT_LENGTH
    embedding_key: str | None = None  # the tensor this encoder takes from an SDXL embedding file

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(_bpe_backend().encode(text, add_special_tokens=False).ids)

    def pad_chunk(self, ids: list[int]) -> list[int]:
        """[BOS] + ids + [EOS] + pads, exactly `context_length` long."""
        room = self.context_length - 2
        if len(ids) > room:
            raise ValueError(f"a chunk holds at most {room} tokens between BOS and EOS, got {len(ids)}")
        chunk = [self.bos_token_id, *ids, self.eos_token_id]
        return chunk + [self.pad_token_id] * (self.context_length - len(chunk))

    def empty_chunk(self) -> list[int]:
        """The encoding of "" (BOS, EOS, pads): the reference point of ComfyUI's prompt weighting."""
        return self.pad_chunk([])


@dataclass(frozen=True)
class SDXLTokenizer:
    """The tokenizer pair of SDXL: CLIP-L pads with EOS, OpenCLIP bigG pads with 0 (the refiner uses `clip_g`)."""

    clip_l: ClipTokenizer = ClipTokenizer(pad_token_id=EOS_TOKEN_ID, embedding_key="clip_l")
    clip_g: ClipTokenizer = ClipTokenizer(pad_token_id=0, embedding_key="clip_g")
