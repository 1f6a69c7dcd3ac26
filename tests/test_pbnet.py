"""Tiny-config tests for PBNet (pose and blink CVAE)."""

from __future__ import annotations

import pytest
import torch

from microscope_pl.models.pbnet import PBNet, pbnet_loss

TINY = dict(audio_dim=16, d_model=32, num_heads=4, num_layers=2, latent_dim=8, dropout=0.0)


def _model(**overrides: object) -> PBNet:
    torch.manual_seed(0)
    model = PBNet(**{**TINY, **overrides})
    # the head is zero-initialised; give it weights so outputs are non-trivial
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.5)
    return model.eval()


def _batch(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, n, 16, generator=g)
    # motion that follows the audio (so the decoder has something to learn)
    motion = torch.cumsum(audio[..., :8] * 0.3, dim=1)
    return audio, motion - motion[:, :1]


@pytest.mark.parametrize("n", [1, 7, 13])
def test_shapes_and_frame0_zero(n: int) -> None:
    model = _model()
    audio, motion = _batch(3, n)
    out = model(audio, motion)
    assert out["motion"].shape == (3, n, 8)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 8)
    assert out["motion"][:, 0].abs().max() == 0
    sample = model.sample(audio)
    assert sample.shape == (3, n, 8) and sample[:, 0].abs().max() == 0


def test_sampling_is_seeded() -> None:
    model = _model()
    audio, _ = _batch(2, 11)
    a = model.sample(audio, generator=torch.Generator().manual_seed(5))
    b = model.sample(audio, generator=torch.Generator().manual_seed(5))
    c = model.sample(audio, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    # temperature 0 is the prior mean, independent of the seed
    d = model.sample(audio, generator=torch.Generator().manual_seed(6), temperature=0.0)
    e = model.sample(audio, generator=torch.Generator().manual_seed(7), temperature=0.0)
    torch.testing.assert_close(d, e)


def test_long_sequence_and_local_window() -> None:
    # window 4, 2 layers: frame t only sees audio within t +- 8 (and frame 0's
    # output, which is subtracted), so changing the last frame's audio must
    # leave frames 1..n-10 untouched; any n works (rotary positions).
    model = _model(attn_window=4)
    audio, _ = _batch(1, 301)
    z = torch.randn(1, 8)
    with torch.no_grad():
        ref = model.decode(audio, z)
        changed = audio.clone()
        changed[:, -1] = torch.randn(16)  # not a constant shift: LayerNorm removes those
        out = model.decode(changed, z)
    assert ref.shape == (1, 301, 8)
    torch.testing.assert_close(out[:, : 301 - 9], ref[:, : 301 - 9])
    assert (out[:, -1] - ref[:, -1]).abs().max() > 1e-4


def test_full_attention_option() -> None:
    model = _model(attn_window=None)
    audio, _ = _batch(1, 9)
    assert model.sample(audio).shape == (1, 9, 8)


def test_bad_inputs_raise() -> None:
    model = _model()
    audio, motion = _batch(2, 5)
    with pytest.raises(ValueError):
        model(audio, motion[:, :4])
    with pytest.raises(ValueError):
        model.sample(audio[..., :10])
    with pytest.raises(ValueError):
        PBNet(audio_dim=16, d_model=30, num_heads=4)


def test_loss_terms() -> None:
    model = _model()
    audio, motion = _batch(2, 6)
    out = model(audio, motion)
    terms = pbnet_loss(out, motion, kl_weight=0.1)
    assert set(terms) == {"loss", "rec", "kl", "pose", "blink"}
    expected_rec = (out["motion"][:, 1:] - motion[:, 1:]).pow(2).mean()
    torch.testing.assert_close(terms["rec"], expected_rec)
    torch.testing.assert_close(terms["loss"], terms["rec"] + 0.1 * terms["kl"])
    assert all(v.ndim == 0 for v in terms.values())


def test_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = PBNet(**TINY).train()
    audio, motion = _batch(4, 20, seed=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for step in range(40):
        out = model(audio, motion, generator=torch.Generator().manual_seed(step))
        loss = pbnet_loss(out, motion, kl_weight=1e-3)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
