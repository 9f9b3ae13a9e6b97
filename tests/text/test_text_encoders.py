import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from sdxl_core.config import CLIP_BIG_G, CLIP_L, TINY_CLIP_G, TINY_CLIP_L
from sdxl_core.text.encoders import TextEncoder

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"
BOOKKEEPING = {"text_model.embeddings.position_ids", "logit_scale"}
TOKENS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70,
                       [49406, 3306, 1002, 256, 49407] + [0] * 72])


def _randomized(config) -> TextEncoder:
    encoder = TextEncoder(config)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
    return encoder


def _manifest(name: str) -> dict:
    path = MANIFESTS / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


@pytest.mark.parametrize("manifest, parts", [
    ("sdxl_base_manifest.json", {"conditioner.embedders.0.transformer.": CLIP_L,
                                 "conditioner.embedders.1.model.": CLIP_BIG_G}),
    ("sdxl_refiner_manifest.json", {"conditioner.embedders.0.model.": CLIP_BIG_G}),
])
def test_full_size_state_dict_matches_single_file_manifest(manifest, parts):
    entries = _manifest(manifest)
    expected = {k: tuple(v["shape"]) for k, v in entries.items() if k.startswith("conditioner.")}
    ours = {}
    for prefix, config in parts.items():
        for key, value in TextEncoder(config, device="meta").state_dict().items():
            ours[prefix + key] = tuple(value.shape)
    bookkeeping = {k for k in expected if any(k.endswith("." + b) for b in BOOKKEEPING)}
    assert len(bookkeeping) == len(parts)  # one per encoder: L's position_ids, G's logit_scale
    assert ours == {k: v for k, v in expected.items() if k not in bookkeeping}


def test_outputs_are_penultimate_hidden_and_projected_first_eos():
    for config in (TINY_CLIP_L, TINY_CLIP_G):
        encoder = _randomized(config)
        assert encoder.hf_model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            hidden, pooled = encoder(TOKENS)
            ref = encoder.hf_model(TOKENS, output_hidden_states=True)
        assert hidden.shape == (2, 77, config.hidden_size)
        assert len(ref.hidden_states) == config.num_layers + 1
        assert torch.equal(hidden, ref.hidden_states[config.num_layers - 1])  # input of the last layer, no LN
        if config.projection_dim is None:
            assert pooled is None
            continue
        text = encoder.hf_model.text_model
        last = text.encoder.layers[-1](ref.hidden_states[-2], _causal_mask(77))
        final = text.final_layer_norm(last[0] if isinstance(last, tuple) else last)
        first_eos = (TOKENS == 49407).int().argmax(dim=1)
        expected = final[torch.arange(2), first_eos] @ encoder.hf_model.text_projection.weight.T
        torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
        assert pooled.shape == (2, config.projection_dim)


def _causal_mask(length: int) -> torch.Tensor:
    mask = torch.full((length, length), float("-inf")).triu(1)
    return mask[None, None]


def test_meta_build_then_assign_load_runs():
    source = _randomized(TINY_CLIP_G)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6052)
    encoder = TextEncoder(TINY_CLIP_G, device="meta")
    assert all(p.is_meta for p in encoder.parameters())
    encoder.load_state_dict(state, assign=True)
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    encoder.to(torch.float64).to(torch.float32)  # no meta tensor left behind (position ids)
    with torch.no_grad():
        for got, want in zip(encoder(TOKENS), source(TOKENS)):
            assert torch.equal(got, want)
    # to_empty leaves buffers uninitialised; loading must still give arange positions.
    empty = TextEncoder(TINY_CLIP_G, device="meta").to_empty(device="cpu")
    empty.hf_model.text_model.embeddings.position_ids.fill_(5)
    empty.load_state_dict(state)
    assert torch.equal(empty.hf_model.text_model.embeddings.position_ids, torch.arange(77)[None])
    with torch.no_grad():
        assert torch.equal(empty(TOKENS)[1], source(TOKENS)[1])


@pytest.mark.parametrize("position_ids, warns", [
    (torch.arange(77)[None], False),
    (torch.arange(77, dtype=torch.float32)[None] + 1e-3, False),  # float ids that round to arange (ComfyUI rounds)
    (torch.arange(77).flip(0)[None], True),  # corrupted: replaced by arange
])
def test_clip_l_position_ids_are_bookkeeping(position_ids, warns, caplog):
    source = _randomized(TINY_CLIP_L)
    state = dict(source.state_dict())
    state["text_model.embeddings.position_ids"] = position_ids
    encoder = TextEncoder(TINY_CLIP_L)
    with caplog.at_level(logging.WARNING, logger="sdxl_core.text.encoders"):
        encoder.load_state_dict(state)
    assert ("position_ids" in caplog.text) == warns
    assert torch.equal(encoder.hf_model.embeddings.position_ids, torch.arange(77)[None])
    with torch.no_grad():
        assert torch.equal(encoder(TOKENS)[0], source(TOKENS)[0])


def test_nested_state_dict_round_trip_and_named_errors():
    class Conditioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_l = _randomized(TINY_CLIP_L)
            self.clip_g = _randomized(TINY_CLIP_G)

    source = Conditioner()
    state = dict(source.state_dict())
    assert "clip_l.text_model.encoder.layers.0.mlp.fc1.weight" in state
    assert "clip_g.transformer.resblocks.0.attn.in_proj_weight" in state
    target = Conditioner()
    target.load_state_dict(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key

    broken = dict(state)
    del broken["clip_g.transformer.resblocks.2.attn.in_proj_bias"]
    broken["clip_l.text_model.surprise"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as error:
        target.load_state_dict(broken)
    message = str(error.value)
    assert '"clip_g.transformer.resblocks.2.attn.in_proj_bias"' in message  # single-file name, not q/k/v
    assert "q_proj" not in message
    assert '"clip_l.text_model.surprise"' in message
    report = target.load_state_dict(broken, strict=False)
    assert report.missing_keys == ["clip_g.transformer.resblocks.2.attn.in_proj_bias"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_fp32(dtype):
    source = _randomized(TINY_CLIP_G)
    encoder = TextEncoder(TINY_CLIP_G, dtype=dtype)
    encoder.load_state_dict(dict(source.state_dict()))
    assert {p.dtype for p in encoder.parameters()} == {dtype}
    with torch.no_grad():
        hidden, pooled = encoder(TOKENS)
        ref_hidden, ref_pooled = source(TOKENS)
    assert hidden.dtype == pooled.dtype == dtype
    for got, want in ((hidden, ref_hidden), (pooled, ref_pooled)):
        assert ((got.float() - want).norm() / want.norm()).item() < 3e-2


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(77, dtype=torch.long), "batch, length"),
    (torch.zeros(1, 77), "integer tensor"),
    (torch.full((1, 78), 49407), "1..77"),
    (torch.full((1, 77), 49408), "49408"),
    (torch.tensor([[49406, 320] + [0] * 75]), "EOS"),
])
def test_bad_tokens_are_rejected(tokens, message):
    with pytest.raises(ValueError, match=message):
        TextEncoder(TINY_CLIP_G)(tokens)


# --- textual-inversion vectors in place of token embeddings ---------------------------------------------------------

def test_embeds_replace_token_embeddings_like_a_vocabulary_with_those_rows():
    """Placing vectors at masked positions equals writing them into unused vocabulary rows and using those ids;
    the pooled vector stays at the first EOS."""
    for config in (TINY_CLIP_L, TINY_CLIP_G):
        encoder = _randomized(config)
        mask = torch.zeros(TOKENS.shape, dtype=torch.bool)
        mask[0, 2:4] = True
        mask[1, 1] = True
        vectors = torch.randn(*TOKENS.shape, config.hidden_size)
        tokens = torch.where(mask, 0, TOKENS)  # placeholder ids under the vectors
        rows = torch.arange(40000, 40000 + int(mask.sum()))  # ids no test token uses
        twin = _randomized(config)
        twin.load_state_dict(encoder.state_dict())
        with torch.no_grad():
            twin.hf_model.get_input_embeddings().weight[rows] = vectors[mask]
            by_hand = tokens.clone()
            by_hand[mask] = rows
            want, want_pooled = twin(by_hand)
            got, got_pooled = encoder(tokens, vectors, mask)
            plain, _ = encoder(tokens)
        assert torch.equal(got, want)
        assert (got_pooled is None) == (config.projection_dim is None)
        if got_pooled is not None:
            assert torch.equal(got_pooled, want_pooled)
        assert not torch.equal(got, plain)
        # the hook lives for one call only
        with torch.no_grad():
            assert torch.equal(encoder(tokens)[0], plain)


@pytest.mark.parametrize("change, message", [
    (lambda v, m: (v, None), "give both or neither"),
    (lambda v, m: (v[..., :-1], m), "float tensor"),
    (lambda v, m: (v, m.float()), "bool tensor"),
    (lambda v, m: (v, torch.ones_like(m)), "embedded position holds EOS"),
])
def test_bad_embeds_are_rejected(change, message):
    encoder = _randomized(TINY_CLIP_G)
    vectors, mask = change(torch.zeros(*TOKENS.shape, 64), torch.zeros(TOKENS.shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        encoder(TOKENS, vectors, mask)
