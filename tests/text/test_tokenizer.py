import gzip
from pathlib import Path

import pytest
import regex

from sdxl_core.text.tokenizer import (
    BOS_TOKEN_ID,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN_ID,
    ClipTokenizer,
    SDXLTokenizer,
    clip_vocabulary,
)

VOCAB_FILE = Path(__file__).parents[2] / "sdxl_core" / "data" / "bpe_simple_vocab_16e6.txt.gz"


def _reference_bpe_ids(text: str) -> list[int]:
    """OpenAI CLIP `SimpleTokenizer.encode` re-derived independently (without ftfy/html, which are no-ops here)."""
    vocab, merges = clip_vocabulary()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_symbols = [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1])[:256]]
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    byte_order = printable + [b for b in range(256) if b not in printable]
    byte_to_symbol = {b: byte_symbols[i] for i, b in enumerate(byte_order)}
    text = regex.sub(r"\s+", " ", text).strip().lower()
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = []
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        word = [byte_to_symbol[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    return ids


def test_vocabulary_matches_openai_derivation():
    vocab, merges = clip_vocabulary()
    assert len(vocab) == CLIP_VOCAB_SIZE == 49408
    assert len(merges) == 49152 - 256 - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS_TOKEN_ID and vocab["<|endoftext|>"] == EOS_TOKEN_ID
    # Hand check against the raw file: id 512 + n is merge line n (line 0 is the version header).
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    assert lines[1 + 1125 - 512] == "pho to</w>" and vocab["photo</w>"] == 1125
    assert lines[1 + 2368 - 512] == "c at</w>" and vocab["cat</w>"] == 2368
    assert lines[1 + 539 - 512] == "o f</w>" and vocab["of</w>"] == 539


@pytest.mark.parametrize("text, ids", [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("A  Photo\nof a CAT!", [320, 1125, 539, 320, 2368, 256]),
    ("!", [256]),
    ("", []),
    ("photorealistic, 8k, masterpiece", [1153, 16157, 267, 279, 330, 267, 12066]),
    ("<|endoftext|>x", [EOS_TOKEN_ID, 343]),  # typed special tokens keep their ids (OpenAI, transformers)
])
def test_pinned_ids(text, ids):
    assert SDXLTokenizer().clip_l.encode(text) == ids
    assert SDXLTokenizer().clip_g.encode(text) == ids


@pytest.mark.parametrize("text", [
    "a photo of a cat",
    "An astronaut riding a green horse, highly detailed, 8k, trending on artstation!!",
    "it's a dog's life; they're here — we'll see (maybe) [brackets] {braces} 1234567",
    "café naïve résumé, ÜBER straße, 日本語のテキスト, emoji 🐱",
    "   leading and   trailing\twhitespace\n\n",
])
def test_ids_equal_independent_reference_bpe(text):
    assert SDXLTokenizer().clip_l.encode(text) == _reference_bpe_ids(text)


def test_padding_conventions():
    tok = SDXLTokenizer()
    ids = tok.clip_l.encode("a photo of a cat")
    assert tok.clip_l.pad_chunk(ids) == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71
    assert tok.clip_g.pad_chunk(ids) == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70
    assert tok.clip_l.empty_chunk() == [49406] + [49407] * 76
    assert tok.clip_g.empty_chunk() == [49406, 49407] + [0] * 75
    # "!" is a character, not the pad: 256 for bigG too (sgm/ComfyUI; diffusers' tokenizer_2 gives 0).
    wow = clip_vocabulary()[0]["wow</w>"]
    assert tok.clip_g.pad_chunk(tok.clip_g.encode("wow!"))[:4] == [49406, wow, 256, 49407]


def test_bad_input_is_rejected():
    tok = ClipTokenizer(pad_token_id=0)
    with pytest.raises(ValueError, match="at most 75"):
        tok.pad_chunk([320] * 76)
    with pytest.raises(TypeError, match="str"):
        tok.encode(None)
