import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdxl_core.config import TINY_CLIP_G
from sdxl_core.text.encoders import TextEncoder
from sdxl_core.text.openclip_conversion import openclip_to_transformers, transformers_to_openclip

BASE_G_PREFIX = "conditioner.embedders.1.model."


def _tiny_hf_bigg() -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, projection_dim=1280,
                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                            hidden_act="gelu", eos_token_id=49407, bos_token_id=49406)
    model = CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a swapped or mis-split tensor shows
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _openclip_state_dict() -> dict[str, torch.Tensor]:
    sd = dict(TextEncoder(TINY_CLIP_G).state_dict())
    for v in sd.values():
        v.normal_(0, 0.2)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_openclip_round_trip_is_exact():
    openclip = _openclip_state_dict()
    back = transformers_to_openclip(openclip_to_transformers(openclip))
    expected = {k: v for k, v in openclip.items() if k != "logit_scale"}  # bookkeeping, dropped
    _assert_same_tensors(back, expected)


def test_transformers_round_trip_is_exact():
    hf = _tiny_hf_bigg().state_dict()
    _assert_same_tensors(openclip_to_transformers(transformers_to_openclip(hf)), dict(hf))


def test_conversion_layout_details():
    openclip = _openclip_state_dict()
    hf = openclip_to_transformers(openclip)
    assert torch.equal(hf["text_projection.weight"], openclip["text_projection"].T)
    fused = openclip["transformer.resblocks.1.attn.in_proj_weight"]
    width = fused.shape[1]
    for i, part in enumerate("qkv"):
        assert torch.equal(hf[f"text_model.encoder.layers.1.self_attn.{part}_proj.weight"],
                           fused[i * width:(i + 1) * width])
    # The caller's tensors are neither modified nor aliased by the split.
    q = hf["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert q.data_ptr() != fused.data_ptr()


def test_matches_diffusers_convert_open_clip_checkpoint():
    reference = _tiny_hf_bigg()
    openclip = transformers_to_openclip(reference.state_dict())
    openclip["logit_scale"] = torch.tensor(4.6052)
    checkpoint = {BASE_G_PREFIX + k: v for k, v in openclip.items()}
    checkpoint["first_stage_model.decoder.conv_in.bias"] = torch.zeros(4)  # other parts of a single file
    by_diffusers = convert_open_clip_checkpoint(reference, checkpoint, prefix=BASE_G_PREFIX)
    ours = openclip_to_transformers(openclip)
    _assert_same_tensors(ours, by_diffusers)
    _assert_same_tensors(ours, dict(reference.state_dict()))

    # And the outputs: our encoder loaded from the OpenCLIP names vs the diffusers-converted transformers model.
    diffusers_model = CLIPTextModelWithProjection(reference.config).eval()
    diffusers_model.load_state_dict(by_diffusers)
    ours_model = TextEncoder(TINY_CLIP_G)
    ours_model.load_state_dict(openclip)
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70,
                           [49406, 3306, 1002, 256, 49407] + [0] * 72])
    with torch.no_grad():
        ref = diffusers_model(tokens, output_hidden_states=True)
        hidden, pooled = ours_model(tokens)
    for got, want in ((hidden, ref.hidden_states[-2]), (pooled, ref.text_embeds)):
        assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_rejects_unknown_and_incomplete_keys():
    openclip = _openclip_state_dict()
    with pytest.raises(KeyError, match="conditioner.embedders.1.model.token_embedding.weight"):
        openclip_to_transformers({BASE_G_PREFIX + k: v for k, v in openclip.items()})
    hf = dict(_tiny_hf_bigg().state_dict())
    del hf["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="found only \\['q', 'v'\\]"):
        transformers_to_openclip(hf)
    bad = dict(openclip)
    bad["transformer.resblocks.0.attn.in_proj_bias"] = torch.zeros(10)
    with pytest.raises(ValueError, match="multiple of 3"):
        openclip_to_transformers(bad)
