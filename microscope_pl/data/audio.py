"""Audio IO and per-frame audio features.

Everything here works on 16 kHz mono float32 waves in [-1, 1] and returns one
feature row per video frame (25 fps), so audio and frames index alike:
frame ``t`` owns the samples ``[t * sr / fps, (t + 1) * sr / fps)``.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import wave as wavemod
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_RATE = 16000
FPS = 25
LOGMEL_BANDS = 80
LOGMEL_HOP = 320  # 20 ms at 16 kHz -> 50 feature frames per second
LOGMEL_WIN = 400  # 25 ms analysis window
LOGMEL_NFFT = 512


# ---------------------------------------------------------------- reading / writing


def _require_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg was not found on PATH; install it (e.g. apt-get install ffmpeg)")
    return exe


def _decode_with_ffmpeg(args: list[str], data: bytes | None, sample_rate: int, what: str) -> np.ndarray:
    """Run ffmpeg with input ``args`` and return its mono f32 output at ``sample_rate``."""
    cmd = [_require_ffmpeg(), "-nostdin", "-v", "error", *args, "-vn", "-sn", "-dn",
           "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        last = err.splitlines()[-1] if err else f"ffmpeg exit code {proc.returncode}"
        if "does not contain any stream" in err or "matches no streams" in err:
            raise ValueError(f"{what}: no audio track")
        raise ValueError(f"{what}: cannot decode audio ({last})")
    wave = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
    if wave.size == 0:
        raise ValueError(f"{what}: no audio track (decoded 0 samples)")
    return np.clip(wave, -1.0, 1.0)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the audio of any file ffmpeg reads -> float32 ``[samples]`` mono in [-1, 1].

    Resamples to ``sample_rate`` and downmixes all channels. Raises ValueError
    for a missing or unreadable file or one without an audio track.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return _decode_with_ffmpeg(["-i", str(path)], None, sample_rate, str(path))


def decode_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Like :func:`load_audio` for an in-memory file (any container ffmpeg reads)."""
    return _decode_with_ffmpeg(["-i", "pipe:0"], data, sample_rate, "<bytes>")


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Write mono PCM16 and return the float32 wave as stored (after quantisation).

    Returning the quantised samples lets callers compute features from exactly
    what a later reader will see.
    """
    pcm = np.round(np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    with wavemod.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return (pcm.astype(np.float32) / 32767.0).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM16 wav (as written by :func:`write_wav`) -> (float32 [samples], rate).

    Multi-channel files are averaged. Faster than ffmpeg for the data loaders.
    """
    with wavemod.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * handle.getsampwidth()}-bit")
        rate, channels = handle.getframerate(), handle.getnchannels()
        data = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    wave = data.astype(np.float32) / 32767.0
    if channels > 1:
        wave = wave.reshape(-1, channels).mean(axis=1)
    return wave.astype(np.float32), rate


# ---------------------------------------------------------------- frame alignment


def resample_to_frames(feats: np.ndarray, num_frames: int, feat_rate: float, fps: float = FPS,
                       offset_s: float = 0.0) -> np.ndarray:
    """Linearly interpolate features ``[K, D]`` sampled at ``feat_rate`` Hz to ``[num_frames, D]``.

    Feature ``k`` is centred at ``offset_s + k / feat_rate`` seconds; frame ``t``
    at ``(t + 0.5) / fps`` (the middle of the samples it owns). Ends are held.
    """
    feats = np.asarray(feats, dtype=np.float32)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if feats.shape[0] == 0:
        return np.zeros((num_frames, feats.shape[1]), np.float32)
    pos = ((np.arange(num_frames) + 0.5) / fps - offset_s) * feat_rate
    pos = np.clip(pos, 0.0, feats.shape[0] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, feats.shape[0] - 1)
    frac = (pos - lo)[:, None].astype(np.float32)
    return (feats[lo] * (1.0 - frac) + feats[hi] * frac).astype(np.float32)


# ---------------------------------------------------------------- log-mel


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = LOGMEL_NFFT, n_mels: int = LOGMEL_BANDS,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular HTK-mel filters -> float32 ``[n_mels, n_fft // 2 + 1]``.

    Each filter is normalised to unit area (Slaney style), so bands of different
    width report comparable energy.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    bins_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins_hz[None] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins_hz[None]) / np.maximum(upper - centre, 1e-9)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= (2.0 / np.maximum(upper - lower, 1e-9))
    return bank.astype(np.float32)


_FILTERBANKS: dict[tuple[int, int, int], torch.Tensor] = {}


def logmel_spectrogram(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """80-band log-mel at 50 Hz (hop 320, window 400) -> float32 ``[K, 80]``.

    Fixed scaling, no per-clip normalisation (so silence stays low in every
    clip): ``(log10(max(mel_power, 1e-8)) + 4) / 4``, about [-1, 1].
    """
    key = (sample_rate, LOGMEL_NFFT, LOGMEL_BANDS)
    if key not in _FILTERBANKS:
        _FILTERBANKS[key] = torch.from_numpy(mel_filterbank(sample_rate, LOGMEL_NFFT, LOGMEL_BANDS))
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.numel() < LOGMEL_NFFT:  # stft needs at least one padded window
        x = torch.nn.functional.pad(x, (0, LOGMEL_NFFT - x.numel()))
    window = torch.hann_window(LOGMEL_WIN)
    spec = torch.stft(x, n_fft=LOGMEL_NFFT, hop_length=LOGMEL_HOP, win_length=LOGMEL_WIN, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    # Normalise by the window sum so a full-scale sine peaks near 0.25 power.
    power = (spec.abs() / window.sum()) ** 2  # [freq, K]
    mel = _FILTERBANKS[key] @ power * (sample_rate / LOGMEL_NFFT)
    logmel = (torch.log10(mel.clamp_min(1e-8)) + 4.0) / 4.0
    return logmel.T.contiguous().numpy().astype(np.float32)


def logmel_features(wave: np.ndarray, num_frames: int, fps: float = FPS,
                    sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-frame log-mel features -> float32 ``[num_frames, 80]`` (50 Hz mel, interpolated)."""
    spec = logmel_spectrogram(wave, sample_rate)
    # With center=True, mel frame k is centred on sample k * hop.
    return resample_to_frames(spec, num_frames, sample_rate / LOGMEL_HOP, fps)


# ---------------------------------------------------------------- loudness


def loudness_db(wave: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-frame RMS level in dBFS -> float32 ``[num_frames]`` (frames past the audio: -100)."""
    wave = np.asarray(wave, dtype=np.float32)
    hop = sample_rate / fps
    need = int(math.ceil(num_frames * hop))
    padded = np.zeros(need, np.float32)
    padded[: min(need, wave.size)] = wave[:need]
    starts = np.round(np.arange(num_frames) * hop).astype(np.int64)
    ends = np.round((np.arange(num_frames) + 1) * hop).astype(np.int64)
    sq = np.concatenate([[0.0], np.cumsum(padded.astype(np.float64) ** 2)])
    rms = np.sqrt((sq[ends] - sq[starts]) / np.maximum(ends - starts, 1))
    return (20.0 * np.log10(np.maximum(rms, 1e-5))).astype(np.float32)


def loudness_envelope(wave: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE,
                      floor_db: float = -60.0) -> np.ndarray:
    """Per-frame loudness normalised to [0, 1] -> float32 ``[num_frames]``.

    ``(dBFS - floor_db) / -floor_db`` clipped: 0 is at or below ``floor_db``
    (silence), 1 is a full-scale square wave. Absolute, so clips compare.
    """
    db = loudness_db(wave, num_frames, fps, sample_rate)
    return np.clip((db - floor_db) / -floor_db, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- level and loudness normalisation

SILENCE_DBFS = -50.0
"""``prepare`` skips a track whose whole-track RMS (decoded 16 kHz mono) is below this.

Measured on the shared real clips: speech tracks are at -8.8 to -22.1 dBFS,
the near-silent clip_d9 at -60.2 dBFS (a flat noise floor, no speech): a
quiet but real recording stays well above -50 dBFS.
"""
LOUDNESS_TARGET_DBFS = -23.0
"""Gated speech level (:func:`speech_level_dbfs`) every prepared track is brought to."""
PEAK_CEILING_DBFS = -1.0
""":func:`normalize_loudness` never raises a sample above this (it lowers the gain instead)."""


def rms_dbfs(wave: np.ndarray) -> float:
    """Whole-track RMS level in dBFS (-inf for digital silence or an empty wave)."""
    wave = np.asarray(wave, dtype=np.float64)
    rms = float(np.sqrt(np.mean(np.square(wave)))) if wave.size else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def speech_level_dbfs(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, block_s: float = 0.4,
                      absolute_gate_dbfs: float = -70.0, relative_gate_db: float = -10.0) -> float:
    """Gated RMS level of speech in dBFS, -inf when nothing passes the gates.

    The gating of ITU-R BS.1770 / EBU R128 integrated loudness without its
    K-weighting filter: mean square power over 400 ms blocks with 75 % overlap,
    blocks quieter than ``absolute_gate_dbfs`` dropped, then blocks more than
    ``-relative_gate_db`` dB below the mean of the rest dropped; the level is
    the mean power of what is left. Pauses between words so do not pull the
    level of a sparse talker down. A wave shorter than one block is one block.
    """
    x = np.asarray(wave, dtype=np.float64).ravel()
    block = max(1, int(round(block_s * sample_rate)))
    hop = max(1, block // 4)
    if x.size <= block:
        powers = np.array([np.mean(x**2)]) if x.size else np.zeros(0)
    else:
        sq = np.concatenate([[0.0], np.cumsum(x**2)])
        starts = np.arange(0, x.size - block + 1, hop)
        powers = (sq[starts + block] - sq[starts]) / block
    powers = powers[powers > 10.0 ** (absolute_gate_dbfs / 10.0)]
    if powers.size == 0:
        return -math.inf
    powers = powers[powers >= powers.mean() * 10.0 ** (relative_gate_db / 10.0)]
    return float(10.0 * math.log10(powers.mean()))


def normalize_loudness(wave: np.ndarray, target_dbfs: float = LOUDNESS_TARGET_DBFS,
                       sample_rate: int = SAMPLE_RATE, peak_dbfs: float = PEAK_CEILING_DBFS) -> np.ndarray:
    """One gain bringing :func:`speech_level_dbfs` of ``wave`` to ``target_dbfs`` -> float32 ``[samples]``.

    The gain is lowered where it would lift a sample above ``peak_dbfs`` (no
    clipping, no limiter: such a track ends up quieter than the target). A
    wave with nothing above the absolute gate (silence) is returned unchanged.
    Apply the same at generation so the model hears speech at the level it
    was trained on.
    """
    wave = np.asarray(wave, dtype=np.float32)
    level = speech_level_dbfs(wave, sample_rate)
    if math.isinf(level):
        return wave.copy()
    gain_db = target_dbfs - level
    peak = float(np.abs(wave).max())
    if peak > 0:
        gain_db = min(gain_db, peak_dbfs - 20.0 * math.log10(peak))
    return (wave * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32)


# ---------------------------------------------------------------- extractor


class AudioFeatureExtractor:
    """Per-frame audio features: ``extractor(wave [samples], num_frames) -> float32 [num_frames, dim]``.

    ``kind="logmel"``: the weight-free 80-band log-mel fallback.
    ``kind="hubert:<model id or local dir>"``: the last hidden state of a
    transformers ``HubertModel`` (1024-d for hubert-large, 50 Hz), interpolated
    to the frame count. Long audio runs in chunks of ``chunk_seconds``.
    """

    def __init__(self, kind: str = "logmel", device: str | torch.device = "cpu", sample_rate: int = SAMPLE_RATE,
                 chunk_seconds: float = 30.0) -> None:
        self.kind = kind
        self.sample_rate = sample_rate
        self.device = torch.device(device)
        self.chunk_seconds = chunk_seconds
        self._model: Any = None
        self._processor: Any = None
        if kind == "logmel":
            self._dim = LOGMEL_BANDS
        elif kind.startswith("hubert:") and len(kind) > len("hubert:"):
            self.model_name = kind[len("hubert:"):]
            self._load_hubert()
            self._dim = int(self._model.config.hidden_size)
        else:
            raise ValueError(f"unknown audio feature kind {kind!r}; use 'logmel' or 'hubert:<model id or local dir>'")

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self._dim

    def _load_hubert(self) -> None:
        from transformers import HubertModel, Wav2Vec2FeatureExtractor

        name = self.model_name
        try:
            model = HubertModel.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
            raise RuntimeError(
                f"cannot load HuBERT weights from {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "pass a local directory holding config.json and the weights "
                "(e.g. --audio-features hubert:/path/to/hubert-large-ls960-ft) or use --audio-features logmel"
            ) from exc
        try:
            processor = Wav2Vec2FeatureExtractor.from_pretrained(name)
        except Exception:  # noqa: BLE001 - a weights-only folder has no preprocessor config
            # hubert-large checkpoints normalise each utterance to zero mean, unit variance.
            processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=self.sample_rate,
                                                 padding_value=0.0, do_normalize=True, return_attention_mask=False)
            print(f"note: {name} has no preprocessor_config.json; using per-utterance normalisation")
        self._model = model.eval().to(self.device)
        self._processor = processor

    def _hubert_rate(self) -> float:
        stride = int(np.prod(self._model.config.conv_stride))
        return self.sample_rate / stride

    def _receptive_field(self) -> int:
        """Samples one output frame of the conv feature encoder sees (400 for hubert-base/large)."""
        field, jump = 1, 1
        for kernel, stride in zip(self._model.config.conv_kernel, self._model.config.conv_stride):
            field += (int(kernel) - 1) * jump
            jump *= int(stride)
        return field

    @torch.no_grad()
    def _hubert(self, wave: np.ndarray) -> np.ndarray:
        """Last hidden state of HuBERT over ``wave`` -> float32 ``[K, dim]`` at ``_hubert_rate()`` Hz."""
        chunk = max(int(self.chunk_seconds * self.sample_rate), self.sample_rate)
        stride = int(np.prod(self._model.config.conv_stride))
        shortest = max(2 * stride, self._receptive_field())
        outs = []
        for start in range(0, wave.size, chunk):
            piece = wave[start:start + chunk]
            if piece.size < shortest:  # too short for the conv stack: pad with silence
                piece = np.pad(piece, (0, shortest - piece.size))
            inputs = self._processor(piece, sampling_rate=self.sample_rate, return_tensors="pt")
            values = inputs["input_values"].to(self.device, torch.float32)
            hidden = self._model(values).last_hidden_state[0]
            # Each chunk contributes exactly its share of feature frames, so chunk joins stay aligned.
            keep = max(int(round(min(chunk, wave.size - start) / stride)), 1)
            rows = hidden[:keep].float().cpu().numpy()
            if rows.shape[0] < keep:  # the conv stack drops a partial window at the end: hold the last row
                rows = np.concatenate([rows, np.repeat(rows[-1:], keep - rows.shape[0], axis=0)])
            outs.append(rows)
        return np.concatenate(outs, axis=0).astype(np.float32)

    def __call__(self, wave: np.ndarray, num_frames: int, fps: float = FPS) -> np.ndarray:
        """Features of ``wave`` (float32 [samples] at ``sample_rate``) -> float32 ``[num_frames, dim]``."""
        wave = np.asarray(wave, dtype=np.float32)
        if self.kind == "logmel":
            return logmel_features(wave, num_frames, fps, self.sample_rate)
        feats = self._hubert(wave)
        rate = self._hubert_rate()
        # Feature k covers samples [k * stride, k * stride + receptive field): centred half a field in.
        offset_s = 0.5 * self._receptive_field() / self.sample_rate
        return resample_to_frames(feats, num_frames, rate, fps, offset_s=offset_s)
