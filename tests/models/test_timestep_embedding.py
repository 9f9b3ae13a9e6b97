import math

import pytest
import torch

from sdxl_core.models.timestep_embedding import timestep_embedding


def test_hand_computed_values_cos_first():
    # dim 4: half = 2, freqs = [1, 10000**-0.5 = 0.01]; t = 1 -> args [1, 0.01]; t = 0 -> cos 1, sin 0.
    emb = timestep_embedding(torch.tensor([1, 0]), 4)
    expected = torch.tensor([[math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)],
                             [1.0, 1.0, 0.0, 0.0]])
    assert emb.dtype == torch.float32
    assert emb.shape == (2, 4)
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-7)


def test_max_period_and_fractional_time():
    # dim 2 -> one frequency, 1.0 regardless of max_period; a fractional t must not be truncated.
    emb = timestep_embedding(torch.tensor([2.5], dtype=torch.float64), 2, max_period=7.0)
    torch.testing.assert_close(emb, torch.tensor([[math.cos(2.5), math.sin(2.5)]]), rtol=0, atol=1e-7)
    # dim 4 with max_period 100: second frequency is 100**-0.5 = 0.1.
    emb = timestep_embedding(torch.tensor([3.0]), 4, max_period=100.0)
    torch.testing.assert_close(emb[0, 1], torch.tensor(math.cos(0.3)), rtol=0, atol=1e-7)


def test_matches_diffusers_get_timestep_embedding():
    diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 1024.0, 6.0])
    for dim in (256, 320):
        ref = diffusers_embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(timestep_embedding(t, dim), ref)


def test_half_precision_input_gives_fp32():
    emb = timestep_embedding(torch.tensor([1024.0], dtype=torch.bfloat16), 256)
    assert emb.dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.tensor(3.0), torch.zeros(2, 1)])
def test_rejects_non_1d(bad):
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(bad, 4)


def test_rejects_odd_dim():
    with pytest.raises(ValueError, match="even dim"):
        timestep_embedding(torch.tensor([1.0]), 5)
