"""Tiny-config tests of the 3D U-Net denoiser and its attention layers."""

from __future__ import annotations

import pytest
import torch

from microscope_pl.diffusion.schedule import DiffusionSchedule
from microscope_pl.models.attention import (
    TemporalAttention,
    apply_rotary,
    local_attention,
    naive_attention,
    rotary_tables,
    sdpa,
)
from microscope_pl.models.unet3d import ConditionEncoder, UNet3D

A, P, B, IC = 8, 6, 2, 3  # audio, pose, blink, image-cond widths of the tiny model


def tiny(**kw) -> UNet3D:
    cfg = dict(in_channels=4, image_cond_channels=IC, audio_dim=A, pose_dim=P, blink_dim=B,
               base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
               num_heads=2, cond_dim=8)
    cfg.update(kw)
    return UNet3D(**cfg)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight: zero-initialised layers would hide all behaviour."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(b: int = 2, n: int = 3, h: int = 4, w: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, 4, n, h, w), t=torch.randint(0, 1000, (b,), generator=g),
                image_cond=r(b, IC, h, w), audio=r(b, n, A), pose=r(b, n, P), blink=r(b, n, B))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("mode", ["cross_attn", "film"])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_shapes_odd_frames(mode: str, n: int) -> None:
    model = tiny(cond_mode=mode)
    for h, w in [(4, 4), (2, 2), (3, 5)]:
        out = model(**inputs(n=n, h=h, w=w))
        assert out.shape == (2, 4, n, h, w)


def test_baseline_channels_and_window() -> None:
    """The DAWN-style baseline: 3 channels, per-frame image cond, a window."""
    model = tiny(in_channels=3, temporal_window=2, channel_mult=(1, 2, 2), attn_levels=(2,))
    x = torch.randn(1, 3, 5, 6, 6)
    out = model(x, torch.tensor([10]), torch.randn(1, IC, 5, 6, 6), torch.randn(1, 5, A),
                torch.randn(1, 5, P), torch.randn(1, 5, B))
    assert out.shape == x.shape


def test_bad_config_and_inputs_raise() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="attn_levels"):
        tiny(attn_levels=(5,))
    model = tiny()
    kw = inputs()
    kw["audio"] = kw["audio"][:, :2]
    with pytest.raises(ValueError, match="audio"):
        model(**kw)


def test_long_sequence_runs() -> None:
    for window in (None, 3):
        model = tiny(base_channels=4, channel_mult=(1,), attn_levels=(), num_heads=1,
                     temporal_window=window)
        out = model(**inputs(b=1, n=1000, h=2, w=2))
        assert out.shape == (1, 4, 1000, 2, 2) and torch.isfinite(out).all()


# ---------------------------------------------------------------- init


def test_zero_init_output_then_learns() -> None:
    torch.manual_seed(0)
    model = tiny()
    kw = inputs()
    out = model(**kw)
    assert torch.equal(out, torch.zeros_like(out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(**kw) - torch.randn_like(out)).pow(2).mean().backward()
    opt.step()
    assert model(**kw).abs().max() > 0


# ---------------------------------------------------------------- attention


def test_global_sdpa_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 2, 11, 6).unbind(0)
    torch.testing.assert_close(sdpa(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_temporal_layer_matches_naive_reference() -> None:
    """The module (LayerNorm, qkv, rotary, SDPA, proj) against a hand-written
    softmax(QK^T)V over the same weights."""
    torch.manual_seed(0)
    layer = randomise(TemporalAttention(8, 2))
    b, n, hh, ww = 2, 9, 2, 3
    x = torch.randn(b * n, 8, hh, ww)
    tok = x.view(b, n, 8, hh, ww).permute(0, 3, 4, 1, 2).reshape(b * hh * ww, n, 8)
    q, k, v = layer.qkv(layer.norm(tok)).view(-1, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
    cos, sin = rotary_tables(n, 4, x.device)
    att = naive_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    ref = layer.proj(att.transpose(1, 2).reshape(-1, n, 8))
    ref = ref.view(b, hh, ww, n, 8).permute(0, 3, 4, 1, 2).reshape(b * n, 8, hh, ww)
    torch.testing.assert_close(layer(x, b, n), x + ref, atol=1e-5, rtol=1e-5)


def test_rotary_is_relative() -> None:
    """Shifting all positions leaves the attention scores unchanged."""
    q, k = torch.randn(2, 1, 6, 8).unbind(0)
    cos, sin = rotary_tables(20, 8, q.device)
    s0 = apply_rotary(q, cos[:6], sin[:6]) @ apply_rotary(k, cos[:6], sin[:6]).transpose(-1, -2)
    s1 = apply_rotary(q, cos[9:15], sin[9:15]) @ apply_rotary(k, cos[9:15], sin[9:15]).transpose(-1, -2)
    torch.testing.assert_close(s0, s1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 5, 7, 11])
@pytest.mark.parametrize("window", [0, 1, 2, 3, 6])
def test_local_attention_is_exact_band(n: int, window: int) -> None:
    torch.manual_seed(n * 10 + window)
    q, k, v = torch.randn(3, 2, 3, n, 4).unbind(0)
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= window
    torch.testing.assert_close(local_attention(q, k, v, window),
                               naive_attention(q, k, v, band), atol=1e-5, rtol=1e-5)
    if window >= n - 1:  # no silent truncation: the band is everything
        torch.testing.assert_close(local_attention(q, k, v, window), sdpa(q, k, v),
                                   atol=1e-5, rtol=1e-5)


def test_local_attention_large_window_equals_global() -> None:
    q, k, v = torch.randn(3, 4, 2, 13, 4).unbind(0)
    for window in (13, 40):
        torch.testing.assert_close(local_attention(q, k, v, window), sdpa(q, k, v),
                                   atol=1e-5, rtol=1e-5)


def test_local_attention_backward_is_finite() -> None:
    qkv = torch.randn(3, 1, 2, 7, 4, requires_grad=True)
    local_attention(*qkv.unbind(0), 2).pow(2).sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_windowed_model_equals_global_when_window_covers_clip() -> None:
    n = 6
    glob = randomise(tiny())
    wide = tiny(temporal_window=n)
    wide.load_state_dict(glob.state_dict())
    kw = inputs(n=n)
    torch.testing.assert_close(wide(**kw), glob(**kw), atol=1e-5, rtol=1e-5)


def test_windowed_model_is_local() -> None:
    """Output frame i never depends on frames beyond the receptive field."""
    model = randomise(tiny(temporal_window=1, channel_mult=(1,), attn_levels=()))
    rf = model.temporal_receptive_field()
    # 4 stages (1 down, 1 mid, 2 up) x (tconv 1 + attention w=1) + the mid's 2nd ResBlock
    assert rf == 4 * 2 + 1
    n = rf + 4
    kw = inputs(b=1, n=n)
    base = model(**kw)
    far = dict(kw)
    far["x"] = kw["x"].clone()
    far["x"][:, :, -1] += 5.0
    far["audio"] = kw["audio"].clone()
    far["audio"][:, -1] += 5.0
    out = model(**far)
    cut = n - 1 - rf  # frames [0, cut) are farther than rf from the last frame
    torch.testing.assert_close(out[:, :, :cut], base[:, :, :cut], atol=1e-5, rtol=1e-5)
    assert (out[:, :, cut:] - base[:, :, cut:]).abs().amax() > 1e-3


def test_frames_independent_of_batch_mates() -> None:
    """Per-frame normalisation: a sample's output ignores the rest of the batch."""
    model = randomise(tiny())
    kw = inputs(b=2)
    both = model(**kw)
    one = model(**{k: v[:1] for k, v in kw.items()})
    torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- guidance


@pytest.mark.parametrize("mode", ["cross_attn", "film"])
def test_dropping_conditions(mode: str) -> None:
    model = randomise(tiny(cond_mode=mode))
    kw = inputs()
    yes = torch.ones(2, dtype=torch.bool)
    no = torch.zeros(2, dtype=torch.bool)
    full = model(**kw)
    assert (model(**kw, drop_audio=yes) - full).abs().amax() > 1e-4
    assert (model(**kw, drop_motion=yes) - full).abs().amax() > 1e-4
    torch.testing.assert_close(model(**kw, drop_audio=no, drop_motion=no), full)

    other = inputs(seed=1)
    swapped = dict(kw, audio=other["audio"], pose=other["pose"], blink=other["blink"])
    torch.testing.assert_close(model(**kw, drop_audio=yes, drop_motion=yes),
                               model(**swapped, drop_audio=yes, drop_motion=yes))
    # Audio dropped: output ignores audio values but still follows motion.
    torch.testing.assert_close(model(**kw, drop_audio=yes),
                               model(**dict(kw, audio=other["audio"]), drop_audio=yes))
    mixed = torch.tensor([True, False])
    out = model(**kw, drop_audio=mixed, drop_motion=mixed)
    torch.testing.assert_close(out[1], full[1])


def test_audio_token_keeps_the_frame_level() -> None:
    # a louder frame of the same spectral shape is a log-mel frame shifted up:
    # LayerNorm alone maps both to one token, and the mouth could not follow loudness
    enc = ConditionEncoder(audio_dim=16, motion_dim=0, cond_dim=8)
    quiet = torch.randn(1, 3, 16)
    tokens = enc(torch.cat([quiet, quiet + 0.5]), None, None)
    assert (tokens[0] - tokens[1]).abs().amax() > 1e-3
    torch.testing.assert_close(enc.audio_norm(quiet), enc.audio_norm(quiet + 0.5))
    assert torch.isfinite(enc(torch.full((1, 2, 16), -1.0), None, None)).all()  # silence: a constant frame


@pytest.mark.parametrize("context", [0, 2])
def test_audio_token_sees_its_context_window_and_no_further(context: int) -> None:
    enc = ConditionEncoder(audio_dim=16, motion_dim=0, cond_dim=8, audio_context=context)
    audio = torch.randn(1, 9, 16)
    moved = audio.clone()
    moved[0, 4] += 1.0  # change frame 4 only
    changed = (enc(moved, None, None) - enc(audio, None, None)).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [abs(i - 4) <= context for i in range(9)]
    assert enc(torch.randn(2, 1, 16), None, None).shape == (2, 1, 1, 8)  # one frame: replicate padding


# ---------------------------------------------------------------- training


def test_overfits_fixed_batch() -> None:
    """The real diffusion loss (random t, q_sample, eps target) falls."""
    torch.manual_seed(0)
    model = tiny().train()
    sched = DiffusionSchedule()
    kw = inputs(b=2, n=3)
    x0 = kw.pop("x")
    kw.pop("t")
    g = torch.Generator().manual_seed(1)
    t_eval = torch.tensor([100, 400, 700, 900])
    noise_eval = torch.randn(4, *x0.shape[1:], generator=g)
    x0_eval = torch.cat([x0, x0])
    kw_eval = {k: torch.cat([v, v]) for k, v in kw.items()}

    def eval_loss() -> float:
        with torch.no_grad():
            xt = sched.q_sample(x0_eval, t_eval, noise_eval)
            return (model(xt, t_eval, **kw_eval) - noise_eval).pow(2).mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        t = sched.sample_timesteps(2, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.q_sample(x0, t, noise)
        loss = (model(xt, t, **kw) - sched.target(x0, noise, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before == pytest.approx(noise_eval.pow(2).mean().item())
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("mode", ["cross_attn", "film"])
def test_per_frame_chunks_at_inference_give_the_same_output(mode: str, monkeypatch) -> None:
    import microscope_pl.models.unet3d as unet3d

    model = randomise(tiny(cond_mode=mode, attn_levels=(0, 1), temporal_window=2))
    kw = inputs(b=2, n=7)
    whole = model(**kw)  # gradients on: the per-frame layers see all 14 frames at once
    monkeypatch.setattr(unet3d, "FRAME_CHUNK", 3)  # 14 frames -> chunks of 3, 3, 3, 3, 2
    seen = []
    blocks = [m for m in model.modules() if isinstance(m, (unet3d.SpaceTimeResBlock, unet3d.SpatialAttention))]
    for layer in (m for block in blocks for m in block.modules() if isinstance(m, torch.nn.GroupNorm)):
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))  # every per-frame norm
    with torch.no_grad():
        chunked = model(**kw)
    assert seen and max(seen) == 3
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5, rtol=1e-5)
