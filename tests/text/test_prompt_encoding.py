import pytest
import torch

from sdxl_core.config import TINY_CLIP_G, TINY_CLIP_L
from sdxl_core.text.embeddings import EmbeddingError
from sdxl_core.text.encoders import TextEncoder
from sdxl_core.text.prompt_encoding import (
    WeightedTokens,
    encode_base_prompt,
    encode_refiner_prompt,
    encode_weighted_tokens,
    pad_chunks,
    tokenize_weighted,
)
from sdxl_core.text.tokenizer import BOS_TOKEN_ID as BOS
from sdxl_core.text.tokenizer import EOS_TOKEN_ID as EOS
from sdxl_core.text.tokenizer import SDXLTokenizer

CAT = 2368  # "cat</w>"
TOK = SDXLTokenizer()


def _randomized(config, seed) -> TextEncoder:
    torch.manual_seed(seed)
    encoder = TextEncoder(config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
    return encoder


@pytest.fixture(scope="module")
def clip_l():
    return _randomized(TINY_CLIP_L, 1)


@pytest.fixture(scope="module")
def clip_g():
    return _randomized(TINY_CLIP_G, 2)


# --- chunking (ComfyUI SDTokenizer.tokenize_with_weights) -----------------------------------------------------------

def test_short_prompt_is_one_padded_chunk():
    for tokenizer, pad in ((TOK.clip_l, EOS), (TOK.clip_g, 0)):
        chunks = tokenize_weighted(tokenizer, "a photo of a cat")
        assert chunks.tokens.tolist() == [[BOS, 320, 1125, 539, 320, 2368, EOS] + [pad] * 70]
        assert torch.equal(chunks.weights, torch.ones(1, 77))
    assert tokenize_weighted(TOK.clip_g, "").tokens.tolist() == [TOK.clip_g.empty_chunk()]


def test_75_tokens_fill_one_chunk_76_need_two():
    assert tokenize_weighted(TOK.clip_l, "cat " * 75).tokens.tolist() == [[BOS] + [CAT] * 75 + [EOS]]
    two = tokenize_weighted(TOK.clip_l, "cat " * 76).tokens.tolist()
    assert two == [[BOS] + [CAT] * 75 + [EOS], [BOS, CAT, EOS] + [EOS] * 74]


def test_short_group_moves_whole_to_next_chunk():
    red_car = TOK.clip_g.encode("red sports car")
    assert len(red_car) == 3
    chunks = tokenize_weighted(TOK.clip_g, "cat " * 74 + "(red sports car:1.3)")
    assert chunks.tokens.tolist() == [[BOS] + [CAT] * 74 + [EOS, 0],
                                      [BOS] + red_car + [EOS] + [0] * 72]
    assert chunks.weights[0].tolist() == [1.0] * 77
    assert chunks.weights[1, 1:4].tolist() == pytest.approx([1.3] * 3)
    assert chunks.weights[1, 4:].tolist() == [1.0] * 73


def test_group_of_eight_or_more_tokens_is_split():
    house = TOK.clip_l.encode("a red sports car parked near the old house")
    assert len(house) == 9
    chunks = tokenize_weighted(TOK.clip_l, "cat " * 70 + "(a red sports car parked near the old house:1.3)")
    assert chunks.tokens.tolist() == [[BOS] + [CAT] * 70 + house[:5] + [EOS],
                                      [BOS] + house[5:] + [EOS] + [EOS] * 71]
    expected_weights = torch.ones(2, 77)
    expected_weights[0, 71:76] = 1.3
    expected_weights[1, 1:5] = 1.3
    torch.testing.assert_close(chunks.weights, expected_weights, rtol=0, atol=0)


# --- weighting and concatenation (ComfyUI encode_token_weights) ----------------------------------------------------

def test_weighted_long_prompt_hand_computed(clip_g):
    prompt = "cat " * 70 + "(a red sports car parked near the old house:1.3), (blue:0.5) sky"
    chunks = tokenize_weighted(TOK.clip_g, prompt)
    assert chunks.num_chunks == 2
    context, pooled = encode_weighted_tokens(clip_g, TOK.clip_g, chunks)
    assert context.shape == (1, 154, TINY_CLIP_G.hidden_size) and context.dtype == torch.float32

    with torch.no_grad():
        raw, raw_pooled = clip_g(chunks.tokens)
        empty, _ = clip_g(torch.tensor([TOK.clip_g.empty_chunk()]))
    weighted_positions = []
    for k in range(2):
        for j in range(77):
            w = float(chunks.weights[k, j])
            got = context[0, 77 * k + j]
            if w == 1.0:
                torch.testing.assert_close(got, raw[k, j], rtol=0, atol=1e-6)
            else:
                weighted_positions.append((k, j, round(w, 6)))
                torch.testing.assert_close(got, (raw[k, j] - empty[0, j]) * w + empty[0, j], rtol=0, atol=1e-6)
                assert not torch.allclose(got, raw[k, j])
    blue = TOK.clip_g.encode("blue")
    assert len(blue) == 1
    assert weighted_positions == ([(0, j, 1.3) for j in range(71, 76)] + [(1, j, 1.3) for j in range(1, 5)]
                                  + [(1, 6, 0.5)])  # after ", " (token 5) comes "blue"
    assert chunks.tokens[1, 6] == blue[0]
    # Pooled comes from the first chunk only, unweighted.
    torch.testing.assert_close(pooled, raw_pooled[:1], rtol=0, atol=1e-6)


def test_unweighted_prompt_skips_the_empty_reference(clip_g):
    calls = []
    handle = clip_g.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        encode_weighted_tokens(clip_g, TOK.clip_g, tokenize_weighted(TOK.clip_g, "cat " * 80))
        encode_weighted_tokens(clip_g, TOK.clip_g, tokenize_weighted(TOK.clip_g, "(cat) " * 80))
    finally:
        handle.remove()
    assert calls == [2, 3]  # two chunks; two chunks + the empty prompt


def test_base_prompt_pads_the_shorter_token_list(clip_l, clip_g):
    context, pooled = encode_base_prompt(clip_l, clip_g, "cat " * 100, "a photo of a cat")
    assert context.shape == (1, 154, 96) and pooled.shape == (1, 1280)
    with torch.no_grad():
        g_second, _ = clip_g(torch.tensor([TOK.clip_g.empty_chunk()]))
        l_all, _ = clip_l(tokenize_weighted(TOK.clip_l, "cat " * 100).tokens)
        _, g_pooled = clip_g(tokenize_weighted(TOK.clip_g, "a photo of a cat").tokens)
    # (Batches of different sizes may round differently in the last bit.)
    torch.testing.assert_close(context[0, 77:, 32:], g_second[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(context[0, :, :32], l_all.reshape(154, 32), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, g_pooled, rtol=0, atol=1e-6)


def test_empty_prompt_modes(clip_l, clip_g):
    encoded, encoded_pooled = encode_base_prompt(clip_l, clip_g, "")
    assert encoded.abs().sum() > 0 and encoded_pooled.abs().sum() > 0
    zeros, zero_pooled = encode_base_prompt(clip_l, clip_g, " ", "", empty_prompt="zeros")
    assert zeros.shape == (1, 77, 96) and zero_pooled.shape == (1, 1280)
    assert not zeros.any() and not zero_pooled.any()
    refiner, refiner_pooled = encode_refiner_prompt(clip_g, "", empty_prompt="zeros")
    assert refiner.shape == (1, 77, 64) and not refiner.any() and not refiner_pooled.any()
    # Only blank prompts are zeroed.
    kept, _ = encode_base_prompt(clip_l, clip_g, "", "a cat", empty_prompt="zeros")
    assert kept.any()
    with pytest.raises(ValueError, match="empty_prompt"):
        encode_base_prompt(clip_l, clip_g, "", empty_prompt="none")


def test_wrong_encoders_are_rejected(clip_l, clip_g):
    with pytest.raises(ValueError, match="clip_l must be the CLIP-L"):
        encode_base_prompt(clip_g, clip_g, "a cat")
    with pytest.raises(ValueError, match="clip_g must be the bigG"):
        encode_refiner_prompt(clip_l, "a cat")
    with pytest.raises(TypeError, match="TextEncoder"):
        encode_refiner_prompt(clip_g.hf_model, "a cat")


# --- parity with diffusers StableDiffusionXL(Img2Img)Pipeline.encode_prompt -----------------------------------------

@pytest.fixture(scope="module")
def diffusers_tokenizers(tmp_path_factory):
    from tests._diffusers_reference import diffusers_clip_tokenizers

    return diffusers_clip_tokenizers(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def diffusers_base(clip_l, clip_g, diffusers_tokenizers):
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = diffusers_tokenizers
    return StableDiffusionXLPipeline(vae=None, text_encoder=clip_l.hf_model, text_encoder_2=clip_g.hf_model,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=None, scheduler=None,
                                     add_watermarker=False)


def _diffusers_encode(pipe, prompt, prompt_2=None, negative=None):
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, prompt_2, device=torch.device("cpu"), do_classifier_free_guidance=True,
            negative_prompt=negative)
    return embeds, pooled, negative_embeds, negative_pooled


@pytest.mark.parametrize("text_l, text_g", [
    ("a photo of a cat", None),
    ("An astronaut riding a green horse, highly detailed, 8k, trending on artstation", None),
    ("watercolor painting", "a lighthouse on a cliff at dusk, dramatic clouds"),
    ("cat " * 75, "dog"),
])
def test_base_matches_diffusers_encode_prompt(clip_l, clip_g, diffusers_base, text_l, text_g):
    embeds, pooled, _, _ = _diffusers_encode(diffusers_base, text_l, text_g)
    context, our_pooled = encode_base_prompt(clip_l, clip_g, text_l, text_g)
    assert context.shape == embeds.shape == (1, 77, 96)
    assert (context - embeds).abs().max() <= 1e-6
    assert (our_pooled - pooled).abs().max() <= 1e-6


def test_empty_negative_matches_diffusers_in_both_modes(clip_l, clip_g, diffusers_base):
    _, _, negative_none, negative_none_pooled = _diffusers_encode(diffusers_base, "a cat", negative=None)
    _, _, negative_empty, negative_empty_pooled = _diffusers_encode(diffusers_base, "a cat", negative="")
    zeros, zero_pooled = encode_base_prompt(clip_l, clip_g, "", empty_prompt="zeros")
    encoded, encoded_pooled = encode_base_prompt(clip_l, clip_g, "", empty_prompt="encode")
    assert torch.equal(zeros, negative_none) and torch.equal(zero_pooled, negative_none_pooled)
    assert (encoded - negative_empty).abs().max() <= 1e-6
    assert (encoded_pooled - negative_empty_pooled).abs().max() <= 1e-6


def test_exclamation_mark_is_the_only_difference_from_diffusers(clip_l, clip_g, diffusers_base):
    prompt = "wow! a cat"
    embeds, pooled, _, _ = _diffusers_encode(diffusers_base, prompt)
    context, our_pooled = encode_base_prompt(clip_l, clip_g, prompt)
    assert (context[..., :32] - embeds[..., :32]).abs().max() <= 1e-6  # CLIP-L: "!" is 256 in both
    assert (context[..., 32:] - embeds[..., 32:]).abs().max() > 1e-3  # bigG: diffusers' tokenizer_2 makes it 0
    tokens = tokenize_weighted(TOK.clip_g, prompt).tokens
    assert (tokens == 256).sum() == 1
    with torch.no_grad():
        quirk_hidden, quirk_pooled = clip_g(torch.where(tokens == 256, 0, tokens))
    assert (quirk_hidden - embeds[..., 32:]).abs().max() <= 1e-6
    assert (quirk_pooled - pooled).abs().max() <= 1e-6
    assert (our_pooled - pooled).abs().max() > 1e-3


def test_refiner_matches_diffusers_img2img_encode_prompt(clip_g, diffusers_tokenizers):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(vae=None, text_encoder=None, text_encoder_2=clip_g.hf_model,
                                            tokenizer=None, tokenizer_2=diffusers_tokenizers[1], unet=None,
                                            scheduler=None, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False, add_watermarker=False)
    embeds, pooled, negative, negative_pooled = _diffusers_encode(pipe, "a lighthouse at dusk", negative="")
    context, our_pooled = encode_refiner_prompt(clip_g, "a lighthouse at dusk")
    assert context.shape == embeds.shape == (1, 77, 64)
    assert (context - embeds).abs().max() <= 1e-6 and (our_pooled - pooled).abs().max() <= 1e-6
    empty, empty_pooled = encode_refiner_prompt(clip_g, "")
    assert (empty - negative).abs().max() <= 1e-6 and (empty_pooled - negative_pooled).abs().max() <= 1e-6


@pytest.mark.heavy
def test_full_size_encoders_match_diffusers(diffusers_tokenizers):
    """Full-size CLIP-L + bigG with random weights (about 3.3 GB fp32 on CPU) against diffusers."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_core.config import CLIP_BIG_G, CLIP_L

    clip_l, clip_g = TextEncoder(CLIP_L), TextEncoder(CLIP_BIG_G)
    tokenizer, tokenizer_2 = diffusers_tokenizers
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=clip_l.hf_model, text_encoder_2=clip_g.hf_model,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=None, scheduler=None,
                                     add_watermarker=False)
    prompt = "a majestic lion jumping from a big stone at night, photorealistic, 8k"
    embeds, pooled, _, _ = _diffusers_encode(pipe, prompt)
    context, our_pooled = encode_base_prompt(clip_l, clip_g, prompt)
    assert context.shape == (1, 77, 2048) and our_pooled.shape == (1, 1280)
    assert ((context - embeds).norm() / embeds.norm()).item() <= 1e-6
    assert ((our_pooled - pooled).norm() / pooled.norm()).item() <= 1e-6
    long_context, _ = encode_base_prompt(clip_l, clip_g, ("(" + prompt + ":1.2), ") * 6)
    assert long_context.shape == (1, 154, 2048) and torch.isfinite(long_context).all()


# --- textual-inversion embeddings (ComfyUI SDTokenizer `embedding:` words, SDClipModel.process_tokens) -------------

def _embedding(n, seed, l_width=TINY_CLIP_L.hidden_size, g_width=TINY_CLIP_G.hidden_size):
    generator = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, l_width, generator=generator),
            "clip_g": torch.randn(n, g_width, generator=generator)}


EMBEDDINGS = {"cat3": _embedding(3, 0), "long10": _embedding(10, 1), "one": _embedding(1, 2)}


def test_embedding_vectors_take_one_position_each_with_their_weight():
    red = TOK.clip_g.encode("red")
    chunks = tokenize_weighted(TOK.clip_g, "a photo of embedding:cat3, red (embedding:one:1.2)", EMBEDDINGS,
                               embedding_width=64)
    assert chunks.tokens[0, :11].tolist() == [BOS, 320, 1125, 539, 0, 0, 0, 267, *red, 0, EOS]
    assert chunks.vector_mask[0].nonzero().flatten().tolist() == [4, 5, 6, 9]
    assert torch.equal(chunks.vectors[0, 4:7], EMBEDDINGS["cat3"]["clip_g"])
    assert torch.equal(chunks.vectors[0, 9], EMBEDDINGS["one"]["clip_g"][0])
    assert chunks.vectors[0, ~chunks.vector_mask[0]].abs().sum() == 0
    assert chunks.weights[0, :11].tolist() == pytest.approx([1.0] * 9 + [1.2, 1.0])
    # Each encoder takes its own tensor.
    l_chunks = tokenize_weighted(TOK.clip_l, "embedding:cat3", EMBEDDINGS, embedding_width=32)
    assert torch.equal(l_chunks.vectors[0, 1:4], EMBEDDINGS["cat3"]["clip_l"])
    # Without any embedding the result carries no vectors at all.
    assert tokenize_weighted(TOK.clip_g, "a cat", EMBEDDINGS, embedding_width=64).vectors is None


def test_long_embedding_is_split_at_the_chunk_boundary_short_one_moves_whole():
    long = tokenize_weighted(TOK.clip_g, "cat " * 70 + "embedding:long10 red", EMBEDDINGS, embedding_width=64)
    red = TOK.clip_g.encode("red")
    assert long.tokens.tolist() == [[BOS] + [CAT] * 70 + [0] * 5 + [EOS], [BOS] + [0] * 5 + red + [EOS] + [0] * 69]
    vectors = EMBEDDINGS["long10"]["clip_g"]
    assert torch.equal(long.vectors[0, 71:76], vectors[:5]) and torch.equal(long.vectors[1, 1:6], vectors[5:])
    assert long.vector_mask.sum() == 10
    short = tokenize_weighted(TOK.clip_g, "cat " * 74 + "embedding:cat3", EMBEDDINGS, embedding_width=64)
    assert short.tokens.tolist() == [[BOS] + [CAT] * 74 + [EOS, 0], [BOS, 0, 0, 0, EOS] + [0] * 72]
    assert short.vector_mask[1].nonzero().flatten().tolist() == [1, 2, 3] and not short.vector_mask[0].any()


def _by_hand(encoder, tokenizer, weighted):
    """The same encoding from a copy of the encoder whose unused vocabulary rows hold the vectors."""
    twin = TextEncoder(encoder.config)
    twin.load_state_dict(encoder.state_dict())
    rows = torch.arange(40000, 40000 + int(weighted.vector_mask.sum()))
    tokens = weighted.tokens.clone()
    tokens[weighted.vector_mask] = rows
    with torch.no_grad():
        twin.hf_model.get_input_embeddings().weight[rows] = weighted.vectors[weighted.vector_mask]
    return encode_weighted_tokens(twin, tokenizer, WeightedTokens(tokens=tokens, weights=weighted.weights))


def test_embedded_prompt_equals_vectors_placed_by_hand(clip_l, clip_g):
    text_g = "cat " * 70 + "(embedding:long10:1.3), embedding:cat3 on a mat"
    text_l = "a (photo:0.8) of embedding:one"
    context, pooled = encode_base_prompt(clip_l, clip_g, text_l, text_g, embeddings=EMBEDDINGS)
    tokens_g = tokenize_weighted(TOK.clip_g, text_g, EMBEDDINGS, embedding_width=64)
    tokens_l = pad_chunks(tokenize_weighted(TOK.clip_l, text_l, EMBEDDINGS, embedding_width=32), TOK.clip_l, 2)
    want_g, want_pooled = _by_hand(clip_g, TOK.clip_g, tokens_g)
    want_l, _ = _by_hand(clip_l, TOK.clip_l, tokens_l)
    assert context.shape == (1, 154, 96)
    torch.testing.assert_close(context, torch.cat([want_l, want_g], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-6)
    # The weight applies to the embedding's positions: the same prompt at weight 1 differs exactly there.
    plain, _ = encode_base_prompt(clip_l, clip_g, text_l, text_g.replace(":1.3)", ":1.0)"), embeddings=EMBEDDINGS)
    differs = (plain - context)[0, :, 32:].abs().amax(-1) > 1e-5
    assert differs.nonzero().flatten().tolist() == [*range(71, 76), *range(77 + 1, 77 + 6)]


def test_refiner_uses_clip_g_only(clip_g, tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_g": EMBEDDINGS["cat3"]["clip_g"]}, str(tmp_path / "g_only.safetensors"))
    save_file({"clip_l": EMBEDDINGS["cat3"]["clip_l"]}, str(tmp_path / "l_only.safetensors"))
    context, pooled = encode_refiner_prompt(clip_g, "a embedding:g_only", embeddings=tmp_path)
    want, want_pooled = encode_refiner_prompt(clip_g, "a embedding:cat3", embeddings=EMBEDDINGS)
    assert torch.equal(context, want) and torch.equal(pooled, want_pooled)
    with pytest.raises(EmbeddingError, match="no 'clip_g'.*'clip_l' .* only, made for the CLIP-L encoder"):
        encode_refiner_prompt(clip_g, "a embedding:l_only", embeddings=tmp_path)


def test_embedding_refusals(clip_l, clip_g, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "sd15.safetensors"))
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}, str(tmp_path / "narrow.safetensors"))
    cases = [
        ("embedding:cat3", None, "no embedding source was given"),
        ("embedding:dog", tmp_path, r"embedding:dog, which is not in .*available: narrow, sd15"),
        ("embedding:sd15", tmp_path, r"'emb_params' has shape \[2, 32\]; expected 'clip_g' of shape \[n, 64\]"),
        ("embedding:narrow", tmp_path, r"shape \[2, 48\]; expected 'clip_g' of shape \[n, 64\]"),
    ]
    for prompt, source, message in cases:
        with pytest.raises(EmbeddingError, match=message):
            encode_base_prompt(clip_l, clip_g, prompt, embeddings=source)
    # An SD1.5 embedding in the CLIP-L prompt alone is fine (ComfyUI takes a one-tensor file for either encoder).
    context, _ = encode_base_prompt(clip_l, clip_g, "embedding:sd15", "a cat", embeddings=tmp_path)
    assert context.shape == (1, 77, 96)


# --- parity with ComfyUI itself (comfy/sd1_clip.py, comfy/sdxl_clip.py, CLIPTextEncodeSDXL) ------------------------

COMFY_PROMPTS = [
    "a photo of a cat",
    "",
    "a (red:1.3) car, ((blue sky)), (wet street:0.7) at night!",
    r"\(escaped\) (nested (inner:1.5) outer:0.8) ((foo):1.2) (unclosed",
    "a ) stray paren (and: text) (time: 12:30) line\nbreak\ttab  spaces",
    "cat " * 74 + "(red sports car:1.3)",
    "cat " * 70 + "(a red sports car parked near the old house:1.3), (blue:0.5) sky",
    ("(a majestic lion jumping from a big stone at night:1.2), photorealistic, 8k, " * 5).strip(),
    "café naïve résumé, 日本語, emoji 🐱 " * 12,
]


@pytest.mark.comfyui
@pytest.mark.parametrize("prompt", COMFY_PROMPTS)
def test_chunks_and_weights_match_comfyui(prompt):
    from tests._comfyui_text_reference import comfy_sdxl_clip

    comfy_tokens = comfy_sdxl_clip().SDXLTokenizer().tokenize_with_weights(prompt)
    for key, tokenizer in (("l", TOK.clip_l), ("g", TOK.clip_g)):
        ours = tokenize_weighted(tokenizer, prompt)
        assert ours.tokens.tolist() == [[t for t, _ in chunk] for chunk in comfy_tokens[key]]
        expected = torch.tensor([[w for _, w in chunk] for chunk in comfy_tokens[key]], dtype=torch.float32)
        assert torch.equal(ours.weights, expected)


@pytest.mark.comfyui
@pytest.mark.parametrize("text_l, text_g", [
    ("a photo of a cat", "a photo of a cat"),
    ("a (red:1.3) car, ((blue sky))", "cat " * 70 + "(a red sports car parked near the old house:1.3), (blue:0.5)"),
    ("cat " * 160, "(dog:0.5)"),
    ("", ""),
])
def test_base_encoding_matches_comfyui(text_l, text_g):
    """Our encoders and ComfyUI's own CLIP code on identical tiny weights, via CLIPTextEncodeSDXL's steps."""
    _compare_base_encoding_with_comfyui(text_l, text_g)


def _compare_base_encoding_with_comfyui(text_l, text_g, embedding_folder=None):
    from sdxl_core.config import TextEncoderConfig
    from sdxl_core.text.openclip_conversion import openclip_to_transformers
    from tests._comfyui_text_reference import comfy_sdxl_clip

    sdxl_clip = comfy_sdxl_clip()
    # ComfyUI's CLIP has a square text_projection, so the tiny bigG projects to its own width here.
    tiny_g = TextEncoderConfig(hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128, hidden_act="gelu",
                               projection_dim=64)
    clip_l, clip_g = _randomized(TINY_CLIP_L, 3), _randomized(tiny_g, 4)
    shape = {"num_hidden_layers": 3, "num_attention_heads": 2}
    comfy = sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options={
        "clip_l_model_config": {**shape, "hidden_size": 32, "intermediate_size": 64},
        "clip_g_model_config": {**shape, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}})
    missing_l, unexpected_l = comfy.clip_l.load_sd(dict(clip_l.state_dict()))
    missing_g, unexpected_g = comfy.clip_g.load_sd(openclip_to_transformers(clip_g.state_dict()))
    assert missing_l == ["text_projection.weight"] and missing_g == [] and not unexpected_l and not unexpected_g

    folder = str(embedding_folder) if embedding_folder is not None else None
    tokenizer = sdxl_clip.SDXLTokenizer(embedding_directory=folder)
    tokens = tokenizer.tokenize_with_weights(text_g)
    tokens["l"] = tokenizer.tokenize_with_weights(text_l)["l"]
    empty = tokenizer.tokenize_with_weights("")
    while len(tokens["l"]) < len(tokens["g"]):
        tokens["l"] += empty["l"]
    while len(tokens["l"]) > len(tokens["g"]):
        tokens["g"] += empty["g"]
    with torch.no_grad():
        want, want_pooled = comfy.encode_token_weights(tokens)
    got, got_pooled = encode_base_prompt(clip_l, clip_g, text_l, text_g, embeddings=embedding_folder)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got_pooled - want_pooled).abs().max() <= 1e-5 * want_pooled.abs().max()


def _embedding_folder(root):
    from safetensors.torch import save_file

    for name, tensors in EMBEDDINGS.items():
        save_file(tensors, str(root / f"{name}.safetensors"))
    (root / "styles").mkdir()
    save_file(_embedding(2, 7), str(root / "styles" / "ink.safetensors"))
    return root


EMBEDDING_PROMPTS = [
    "a photo of embedding:cat3 on a mat",
    "(embedding:cat3:1.2), embedding:one, blue",
    "embedding:cat3.safetensors\nembedding:styles/ink sky embedding:ink",
    "cat " * 70 + "embedding:long10 red",
    "cat " * 74 + "(embedding:cat3:0.7) and more",
    "cat " * 30 + "(embedding:long10 with text:1.4) " + "dog " * 40 + "embedding:long10",
]


@pytest.mark.comfyui
@pytest.mark.parametrize("prompt", EMBEDDING_PROMPTS)
def test_embedding_tokens_match_comfyui(prompt, tmp_path):
    from tests._comfyui_text_reference import comfy_sdxl_clip

    folder = _embedding_folder(tmp_path)
    comfy_tokens = comfy_sdxl_clip().SDXLTokenizer(embedding_directory=str(folder)).tokenize_with_weights(prompt)
    for key, tokenizer, width in (("l", TOK.clip_l, 32), ("g", TOK.clip_g, 64)):
        ours = tokenize_weighted(tokenizer, prompt, folder, embedding_width=width)
        theirs = comfy_tokens[key]
        assert ours.num_chunks == len(theirs)
        spliced = sum(isinstance(item, torch.Tensor) for chunk in theirs for item, _ in chunk)
        assert spliced == int(ours.vector_mask.sum()) > 0  # ComfyUI found every embedding too
        for c, chunk in enumerate(theirs):
            for j, (item, weight) in enumerate(chunk):
                assert ours.weights[c, j] == torch.tensor(weight, dtype=torch.float32)
                if isinstance(item, torch.Tensor):
                    assert ours.vector_mask[c, j]
                    assert (ours.vectors[c, j] - item).abs().max() <= 1e-5
                else:
                    assert not (ours.vector_mask is not None and ours.vector_mask[c, j])
                    assert int(ours.tokens[c, j]) == item


@pytest.mark.comfyui
@pytest.mark.parametrize("text_l, text_g", [
    ("a photo of embedding:cat3", "a photo of embedding:cat3"),
    ("(embedding:one:1.3) blue", "cat " * 70 + "(embedding:long10:1.2), embedding:styles/ink"),
])
def test_base_encoding_with_embeddings_matches_comfyui(text_l, text_g, tmp_path):
    _compare_base_encoding_with_comfyui(text_l, text_g, _embedding_folder(tmp_path))
