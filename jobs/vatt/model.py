"""VATT with one modality-agnostic Transformer: tokenizers, DropToken, shared encoder, common-space heads.

No training or distributed code here. Shapes: B batch, T frames, H=W frame side, L waveform samples,
N words, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jobs.vatt.config import ModelConfig


def drop_tokens(x_BSD: torch.Tensor, rate: float) -> torch.Tensor:
    """DropToken: keep a random (1 - rate) of the tokens, one permutation shared by the batch."""
    keep = max(1, round(x_BSD.shape[1] * (1 - rate)))
    order = torch.randperm(x_BSD.shape[1], device=x_BSD.device)[:keep]
    return x_BSD[:, order.sort().values]


class Tokenizer(nn.Module):
    """Patches (or words) -> d_model tokens with learned position embeddings and an AGG token in front."""

    def __init__(self, embed: nn.Module, in_dim: int, num_tokens: int, d_model: int):
        super().__init__()
        self.embed = embed
        self.project = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU())  # VATT's pre-projection
        self.position = nn.Parameter(torch.zeros(1, num_tokens, d_model))
        self.agg = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.agg, std=0.02)

    def forward(self, raw: torch.Tensor, drop_rate: float) -> torch.Tensor:
        x_BSD = self.project(self.embed(raw)) + self.position
        if self.training and drop_rate > 0:
            x_BSD = drop_tokens(x_BSD, drop_rate)
        return torch.cat([self.agg.expand(len(x_BSD), -1, -1), x_BSD], dim=1)


class VideoPatches(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        frames, pixels = cfg.video_patch
        self.conv = nn.Conv3d(3, cfg.d_model, kernel_size=(frames, pixels, pixels), stride=(frames, pixels, pixels))

    def forward(self, video_B3THW: torch.Tensor) -> torch.Tensor:
        if video_B3THW.dtype == torch.uint8:  # clips travel as bytes (a quarter of fp32 in host memory and in the copy) and become floats here
            video_B3THW = video_B3THW.float() / 127.5 - 1.0
        return self.conv(video_B3THW).flatten(2).transpose(1, 2)  # (B, tokens, D)


class AudioPatches(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.conv = nn.Conv1d(1, cfg.d_model, kernel_size=cfg.audio_patch, stride=cfg.audio_patch)

    def forward(self, audio_BL: torch.Tensor) -> torch.Tensor:
        return self.conv(audio_BL.unsqueeze(1)).transpose(1, 2)


class FrozenWords(nn.Module):
    """A fixed word-embedding table (VATT keeps its word2vec table frozen)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        table = torch.randn(cfg.vocab_size, cfg.word_dim, generator=torch.Generator().manual_seed(1234))
        table[0] = 0  # padding
        self.register_buffer("table", table)

    def forward(self, text_BN: torch.Tensor) -> torch.Tensor:
        return self.table[text_BN]


@dataclass
class Outputs:
    video_BD: torch.Tensor  # pooled video feature: the representation both losses share
    audio_BD: torch.Tensor
    text_BD: torch.Tensor


class VATT(nn.Module):
    """Tokenize each modality, run the shared encoder, pool the AGG token, post-project."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.video = Tokenizer(VideoPatches(cfg), d, cfg.num_video_tokens, d)
        self.audio = Tokenizer(AudioPatches(cfg), d, cfg.num_audio_tokens, d)
        self.text = Tokenizer(FrozenWords(cfg), cfg.word_dim, cfg.text_len, d)
        layer = nn.TransformerEncoderLayer(d, cfg.num_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True, layer_norm_eps=1e-6)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.post = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, cfg.post_dim), nn.GELU()) for m in ("video", "audio", "text")})

    def encode(self, modality: str, tokens_BSD: torch.Tensor, pad_BS: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.norm(self.encoder(tokens_BSD, src_key_padding_mask=pad_BS))[:, 0]  # AGG token
        return self.post[modality](pooled)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Outputs:
        rate = self.cfg.drop_token
        pad = torch.cat([torch.zeros_like(text[:, :1], dtype=torch.bool), text == 0], dim=1)  # AGG never padded
        return Outputs(
            video_BD=self.encode("video", self.video(video, rate)),
            audio_BD=self.encode("audio", self.audio(audio, rate)),
            text_BD=self.encode("text", self.text(text, 0.0), pad),
        )


class CommonSpace(nn.Module):
    """VATT's FAC head: video and audio meet in VA; VA (of video) and text meet in VAT."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        va, vat = cfg.va_dim, cfg.vat_dim
        self.video_va = nn.Sequential(nn.Linear(cfg.post_dim, va, bias=False), nn.BatchNorm1d(va, eps=1e-5, momentum=0.1), nn.ReLU(), nn.Linear(va, va), nn.BatchNorm1d(va))
        self.audio_va = nn.Linear(cfg.post_dim, va)
        self.va_vat = nn.Sequential(nn.ReLU(), nn.Linear(va, vat), nn.BatchNorm1d(vat))
        self.text_vat = nn.Linear(cfg.post_dim, vat)

    def forward(self, video_BD, audio_BD, text_BD):
        video_va = self.video_va(video_BD)
        return video_va, self.audio_va(audio_BD), self.va_vat(video_va), self.text_vat(text_BD)


@dataclass
class Embeddings:
    video_BD: torch.Tensor  # the pooled video feature: the representation both losses share
    video_va: torch.Tensor
    audio_va: torch.Tensor
    video_vat: torch.Tensor
    text_vat: torch.Tensor


class VattModel(nn.Module):
    """Backbone plus heads in one module, so DDP/DeepSpeed/Accelerate wrap (and sync) all of it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = VATT(cfg)
        self.heads = CommonSpace(cfg)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Embeddings:
        out = self.backbone(video, audio, text)
        return Embeddings(out.video_BD, *self.heads(out.video_BD, out.audio_BD, out.text_BD))
