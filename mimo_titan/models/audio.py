"""Audio encoder: Whisper's encoder, average pooling over time and an MLP projector into the language model.

The encoder is the one of Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (Whisper,
2022): two 1-D convolutions over the log-mel frames (the second of stride 2: one encoder frame per 20 ms of audio),
fixed sinusoidal positions, pre-norm transformer layers with bidirectional self-attention and a final LayerNorm.
Unlike Whisper, which always encodes a 30-s window, clips of different lengths share a batch: a key-padding mask
keeps every clip's frames from attending to the batch's padding, so a clip encodes the same however much padding
the batch adds. ``pool`` consecutive encoder frames are then averaged into one language-model token (as audio LLMs
such as Qwen2-Audio do with ``pool = 2``) and a two-layer GELU MLP (LLaVA-1.5's projector) maps it to the language
model's hidden size.

Parameter names follow Hugging Face's ``WhisperModel`` (``encoder.conv1``, ``encoder.embed_positions.weight``,
``encoder.layers.{i}.self_attn.q_proj``, ..., ``encoder.layer_norm``), so weight import is a name map
(:mod:`mimo_titan.checkpoint.hf_whisper`); the projector (``projector.linear_1`` / ``linear_2``) is ours.

Shape legend: N clips, M mel bins, T mel frames (10 ms each), S encoder frames (``ceil(T / 2)``, 20 ms each),
D encoder width, R language-model tokens of the whole batch, H language-model hidden size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mimo_titan.errors import DataError
from mimo_titan.models.init import InitRule, init_module_, layer_init_rules, resolve_seed
from mimo_titan.models.vit import Projector

if TYPE_CHECKING:
    from mimo_titan.config import AudioModelConfig

__all__ = ["AudioEncoder", "WhisperEncoder", "audio_tokens", "sinusoids"]


def audio_tokens(num_frames: int, cfg: AudioModelConfig) -> int:
    """Language-model tokens of a clip of ``num_frames`` log-mel frames (10 ms each).

    The stride-2 convolution gives ``S = ceil(num_frames / 2)`` encoder frames and pooling ``cfg.pool`` of them
    into one token gives ``ceil(S / pool)`` tokens (the last group may be partial); 0 frames give 0 tokens.

    Raises:
        ValueError: ``num_frames < 0``.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames={num_frames} must be >= 0")
    return -(-((num_frames + 1) // 2) // cfg.pool)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding: ``[length, channels]`` float32, sines then cosines.

    Frequency ``j`` of ``channels / 2`` is ``max_timescale ** (-j / (channels / 2 - 1))``; row ``t`` holds
    ``sin(t * freq)`` for every frequency followed by ``cos(t * freq)`` (Whisper's ``sinusoids``).

    Raises:
        ValueError: an odd ``channels``.
    """
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels} (model.<audio>.hidden_size)")
    half = channels // 2
    inv_timescales = torch.exp(-math.log(max_timescale) / max(half - 1, 1) * torch.arange(half, dtype=torch.float32))
    scaled_LC = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_LC.sin(), scaled_LC.cos()], dim=1)


class _Positions(nn.Module):
    """The sinusoidal table as a persistent buffer named ``weight`` (HF's ``embed_positions.weight``): saved and
    loaded with the weights but not a parameter, so it gets no gradient or optimizer state (HF freezes it too)."""

    weight: torch.Tensor

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(length, dim), persistent=True)

    def init_rules(self, std: float = 0.02) -> dict[str, InitRule]:
        """Whisper's sinusoids (:mod:`mimo_titan.models.init`; ``std`` unused)."""
        return {"weight": InitRule("table", table=lambda shape: sinusoids(*shape))}


class _Attention(nn.Module):
    """Multi-head self-attention with Whisper's projections: ``k_proj`` has no bias, q / v / out have one."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.<audio>.hidden_size={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x_NSD: torch.Tensor, keep_N11S: torch.Tensor | None) -> torch.Tensor:
        n, s, d = x_NSD.shape
        hd = d // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # under tensor parallelism a rank holds heads / tp heads
            return t.view(n, s, t.shape[-1] // hd, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_NSD)), heads(self.k_proj(x_NSD)), heads(self.v_proj(x_NSD))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_N11S)  # bidirectional; True = may attend
        return self.out_proj(out.transpose(1, 2).reshape(n, s, out.shape[1] * hd))


class WhisperEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(self_attn_layer_norm(x))`` then ``x + fc2(gelu(fc1(final_layer_norm(x))))``."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = _Attention(dim, num_heads)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, dim)

    def forward(self, x_NSD: torch.Tensor, keep_N11S: torch.Tensor | None) -> torch.Tensor:
        x_NSD = x_NSD + self.self_attn(self.self_attn_layer_norm(x_NSD), keep_N11S)
        return x_NSD + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x_NSD))))  # exact (erf) GELU, as Whisper


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder over clips of different lengths.

    Args:
        cfg: ``AudioModelConfig`` (num_mel_bins, hidden_size, num_layers, num_heads, intermediate_size,
            max_source_positions, layer_norm_eps).

    Forward:
        ``input_features [N, M, T]`` float log-mel frames (M = ``num_mel_bins``) and ``num_frames [N]`` int64,
        each clip's valid frames (``None``: all ``T``) → ``[N, S, D]`` in the parameters' dtype, ``S = ceil(T / 2)``.
        Frame ``j`` of clip ``i`` is valid for ``j < ceil(num_frames[i] / 2)``; the others are zero.
    """

    def __init__(self, cfg: AudioModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_mel_bins = cfg.num_mel_bins
        self.max_source_positions = cfg.max_source_positions
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = _Positions(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        )
        self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_features_NMT: torch.Tensor, num_frames_N: torch.Tensor | None = None) -> torch.Tensor:
        if input_features_NMT.dim() != 3 or input_features_NMT.shape[1] != self.num_mel_bins:
            raise ValueError(
                f"audio input_features must be [clips, num_mel_bins={self.num_mel_bins}, frames], got "
                f"{list(input_features_NMT.shape)}; compute them with mimo_titan.data.audio.log_mel(num_mel_bins="
                f"{self.num_mel_bins}) or set model.<audio>.num_mel_bins to the features' bins"
            )
        n, _, t = input_features_NMT.shape
        s = (t + 1) // 2
        if s > self.max_source_positions:
            raise DataError(
                f"an audio batch of {t} mel frames ({t / 100:g} s) needs {s} encoder positions, more than "
                f"model.<audio>.max_source_positions={self.max_source_positions} "
                f"({self.max_source_positions * 2 / 100:g} s); cut the clips shorter or raise max_source_positions"
            )
        x_NMT = input_features_NMT.to(self.conv1.weight.dtype)
        if t == 0:  # a batch of empty clips (the convolutions need at least one frame)
            return x_NMT.new_zeros(n, 0, self.layer_norm.normalized_shape[0])
        keep_N11S = None
        if num_frames_N is not None:
            num_frames_N = num_frames_N.to(device=x_NMT.device, dtype=torch.long)
            if num_frames_N.shape != (n,) or bool(((num_frames_N < 0) | (num_frames_N > t)).any()):
                raise ValueError(
                    f"num_frames must be [{n}] with values in [0, {t}] (the padded frame count), got "
                    f"{num_frames_N.tolist()}"
                )
            # zero the padding before each convolution: a clip's last frames then see exactly the zeros that
            # the convolution's own padding gives the clip alone
            frame_N1T = (torch.arange(t, device=x_NMT.device) < num_frames_N[:, None])[:, None, :]
            x_NMT = torch.where(frame_N1T, x_NMT, 0.0)
            h_NDT = torch.where(frame_N1T, F.gelu(self.conv1(x_NMT)), 0.0)
            valid_NS = torch.arange(s, device=x_NMT.device) < ((num_frames_N + 1) // 2)[:, None]
            # a clip of 0 frames still attends to its frame 0 (an all-masked row of softmax would be nan)
            keep_N11S = (valid_NS | (torch.arange(s, device=x_NMT.device) == 0))[:, None, None, :]
        else:
            h_NDT = F.gelu(self.conv1(x_NMT))
        h_NSD = F.gelu(self.conv2(h_NDT)).transpose(1, 2)
        h_NSD = h_NSD + self.embed_positions.weight[:s].to(h_NSD.dtype)
        for layer in self.layers:
            h_NSD = layer(h_NSD, keep_N11S)
        h_NSD = self.layer_norm(h_NSD)
        if num_frames_N is not None:
            h_NSD = torch.where(valid_NS[:, :, None], h_NSD, 0.0)
        return h_NSD


class AudioEncoder(nn.Module):
    """The audio module of a MIMO model: Whisper encoder, average pooling of ``pool`` frames, projector.

    Args:
        cfg: ``AudioModelConfig``.
        lm_hidden_size: the language model's hidden size H.

    Forward:
        ``input_features [N, M, T]`` float log-mel frames (10 ms hop, padded to the batch's longest clip; see
        :func:`mimo_titan.data.audio.log_mel`) and ``num_frames [N]`` int64 (each clip's valid frames ``F``) →
        ``rows [R, H]`` in the parameters' dtype: the LM tokens of every clip concatenated in clip order, clip ``i``
        giving :func:`audio_tokens` ``(F_i, cfg)`` rows. Padded frames are masked out of the attention and the
        pooling (the last, partial group of a clip averages its valid frames only), so a clip's rows do not depend
        on the batch it is in.

    Raises:
        DataError: a batch longer than ``max_source_positions`` encoder frames.
        ValueError: features without ``num_mel_bins`` bins, or ``num_frames`` out of ``[0, T]``.
    """

    def __init__(self, cfg: AudioModelConfig, lm_hidden_size: int):
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.projector = Projector(cfg.hidden_size, cfg.projector_intermediate_size, lm_hidden_size)
        self.pool = cfg.pool
        self.out_dim = lm_hidden_size
        self.cfg = cfg

    def encode_frames(self, input_features_NMT: torch.Tensor, num_frames_N: torch.Tensor | None = None) -> torch.Tensor:
        """Whisper's last hidden state ``[N, S, D]`` (before pooling and projector); see :class:`WhisperEncoder`."""
        return self.encoder(input_features_NMT, num_frames_N)

    def num_tokens(self, num_frames_N: torch.Tensor) -> torch.Tensor:
        """:func:`audio_tokens` of every clip: ``[N]`` int64 from ``num_frames [N]`` int64."""
        return -(-((num_frames_N + 1) // 2) // self.pool)

    def forward(self, input_features_NMT: torch.Tensor, num_frames_N: torch.Tensor) -> torch.Tensor:
        h_NSD = self.encoder(input_features_NMT, num_frames_N)
        n, s, d = h_NSD.shape
        valid_NS = torch.arange(s, device=h_NSD.device) < ((num_frames_N.to(h_NSD.device) + 1) // 2)[:, None]
        if self.pool == 1:
            rows_RD = h_NSD[valid_NS]  # row-major: clip order, then time
        else:
            k = self.pool
            g = -(-s // k)
            h_NGKD = F.pad(h_NSD, (0, 0, 0, g * k - s)).view(n, g, k, d)  # padded frames are zero
            count_NG = F.pad(valid_NS, (0, g * k - s)).view(n, g, k).sum(-1)
            mean_NGD = h_NGKD.sum(2) / count_NG.clamp(min=1)[:, :, None].to(h_NGKD.dtype)
            rows_RD = mean_NGD[count_NG > 0]
        return self.projector(rows_RD)

    def init_rules(self, std: float = 0.02) -> dict[str, InitRule]:
        """Init of every tensor, names relative to this encoder (:mod:`mimo_titan.models.init`): truncated
        normal(std) weights, zero biases, unit LayerNorm scales, Whisper's sinusoidal positions (a buffer)."""
        return layer_init_rules(self, std)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise in place (:meth:`init_rules`, :func:`~mimo_titan.models.init.init_module_`) from ``seed``, or
        with None from a seed drawn from the global torch RNG; also fills tensors built on the meta device and
        materialized with ``to_empty``."""
        init_module_(self, resolve_seed(seed))
