"""VATT with one modality-agnostic Transformer: tokenizers, DropToken, shared encoder, common-space heads.

No training or distributed code here. Shapes: B batch, T frames, H=W frame side, L waveform samples,
N words, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jobs.vatt.config import ModelConfig
from labtrain import dist


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
    text_BD: torch.Tensor  # (B, D), or (B, K, D) for K candidate texts
    video_tokens_BSD: torch.Tensor  # the video tokens entering the shared backbone's last block


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

    def encode(self, modality: str, tokens_BSD: torch.Tensor, pad_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-projected AGG token, and the tokens entering the last block (a harmonization target)."""
        x = tokens_BSD
        *first, last = self.encoder.layers
        for layer in first:
            x = layer(x, src_key_padding_mask=pad_BS)
        last_input = x = x.float()  # a harmonization target must be the tensor the last block reads (fp32 under autocast too)
        pooled = self.norm(last(x, src_key_padding_mask=pad_BS))[:, 0]  # AGG token
        return self.post[modality](pooled), last_input

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Outputs:
        """``text`` is (B, N) words or (B, K, N): K candidate texts per clip, encoded apart, (B, K, D) out."""
        rate = self.cfg.drop_token
        words_XN = text.flatten(0, -2)
        pad = torch.cat([torch.zeros_like(words_XN[:, :1], dtype=torch.bool), words_XN == 0], dim=1)  # AGG never padded
        text_XD, _ = self.encode("text", self.text(words_XN, 0.0), pad)
        video_BD, video_tokens = self.encode("video", self.video(video, rate))
        return Outputs(video_BD=video_BD, audio_BD=self.encode("audio", self.audio(audio, rate))[0], text_BD=text_XD.unflatten(0, text.shape[:-1]), video_tokens_BSD=video_tokens)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


class DetachedBatchNorm(nn.BatchNorm1d):
    """Batch norm whose batch statistics are constants in the backward pass: the forward is batch norm's, but a
    sample's gradient no longer flows through the other samples, so per-sample gradients taken in train mode
    are each sample's own. Across ranks the statistics are the global batch's (cross-replica, as VATT's batch
    norm): two all-reduces of about D numbers per layer and forward, every rank the same mean and variance."""

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x_BD)
        x_BD = x_BD.float()  # statistics in fp32, as autocast runs batch norm (a bf16 input would also not fit the fp32 running buffers)
        with torch.no_grad():
            sums = torch.cat([x_BD.sum(0), x_BD.new_tensor([len(x_BD)])])
            _sum_over_ranks(sums)
            n, mean = sums[-1], sums[:-1] / sums[-1]
            var = _sum_over_ranks((x_BD - mean).pow(2).sum(0)) / n  # two passes: no cancellation in E[x^2] - E[x]^2
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp_min(1), self.momentum)
        return (x_BD - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class CommonSpace(nn.Module):
    """VATT's FAC head: video and audio meet in VA; VA (of video) and text meet in VAT.

    VATT normalizes with (cross-replica) batch norm, which mixes a batch's samples: a sample's gradient then
    depends on the others, and the per-sample gradients of harmonization are not the sample's own. ``head_norm:
    layer`` (the default) uses layer norm there instead."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        va, vat = cfg.va_dim, cfg.vat_dim

        def norm(width: int) -> nn.Module:
            kind = {"batch": nn.BatchNorm1d, "batch_detached": DetachedBatchNorm}.get(cfg.head_norm)
            return kind(width, eps=1e-5, momentum=0.1) if kind else nn.LayerNorm(width, eps=1e-5)

        self.video_va = nn.Sequential(nn.Linear(cfg.post_dim, va, bias=False), norm(va), nn.ReLU(), nn.Linear(va, va), norm(va))
        self.audio_va = nn.Linear(cfg.post_dim, va)
        self.va_vat = nn.Sequential(nn.ReLU(), nn.Linear(va, vat), norm(vat))
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
    text_vat: torch.Tensor  # (B, K, vat_dim): K candidate texts per clip
    video_tokens_BSD: torch.Tensor | None = None  # the video tokens entering the backbone's last block


class VattModel(nn.Module):
    """Backbone plus heads in one module, so DDP/DeepSpeed/Accelerate wrap (and sync) all of it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = VATT(cfg)
        self.heads = CommonSpace(cfg)

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor) -> Embeddings:
        if text.dim() == 2:
            text = text.unsqueeze(1)  # one candidate text per clip
        out = self.backbone(video, audio, text)
        # The pooled video feature is a harmonization target: the heads must read this very tensor. Under bf16
        # autocast it is bf16, and the fp32 copy the strategy hands back would not be in the losses' graph.
        video_BD = out.video_BD.float()
        return Embeddings(video_BD, *self.heads(video_BD, out.audio_BD, out.text_BD), video_tokens_BSD=out.video_tokens_BSD)
