"""Config of the VATT job: sizes, the synthetic corpus, harmonization switches, and the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from labtrain.config import Config, DataConfig, RunConfig, StoragePath, StoragePaths


class ModelConfig(Config):
    """VATT with one modality-agnostic Transformer (the paper's "ut_fac")."""

    d_model: int = Field(64, ge=8, description="Transformer width (Base: 768).")
    num_layers: int = Field(2, ge=1, description="Shared Transformer layers (Base: 12).")
    num_heads: int = Field(4, ge=1, description="Attention heads (Base: 12); must divide d_model.")
    d_ff: int = Field(128, ge=8, description="Feed-forward width (Base: 3072).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in the Transformer.")
    num_frames: int = Field(8, ge=1, description="Frames per clip (Base: 32).")
    frame_size: int = Field(32, ge=4, description="Square frame side in pixels (Base: 224).")
    video_patch: tuple[int, int] = Field((2, 8), description="Video patch (frames, pixels): kernel = stride of the 3-D conv (Base: (4, 16)).")
    audio_samples: int = Field(1024, ge=8, description="Raw waveform samples per clip.")
    audio_patch: int = Field(64, ge=1, description="Waveform samples per audio token (Base: 128).")
    text_len: int = Field(8, ge=1, description="Words per text (Base: 16).")
    text_candidates: int = Field(3, ge=1, description="Candidate texts per clip, the bag MIL-NCE takes the best of (VATT pairs a clip with its neighbouring narrations).")
    vocab_size: int = Field(256, ge=2, description="Word ids 0..vocab_size-1; 0 is padding (Base: 2**16).")
    word_dim: int = Field(32, ge=1, description="Frozen word-embedding width (Base: 300).")
    drop_token: float = Field(0.5, ge=0, lt=1, description="Share of video and audio tokens dropped in training (DropToken).")
    post_dim: int = Field(128, ge=8, description="Modality-specific post-projection width (Base: 1024).")
    va_dim: int = Field(64, ge=8, description="Video-audio common space (Base: 512).")
    vat_dim: int = Field(32, ge=8, description="Video-audio-text common space (Base: 256).")
    temperature: float = Field(0.07, gt=0, description="NCE temperature.")
    head_norm: Literal["batch_detached", "layer", "batch"] = Field("batch_detached", description="Normalization in the common-space heads: 'batch' is VATT's (its backward mixes a batch's samples, so per-sample gradients are not the samples' own); 'batch_detached' normalizes the same way with the batch statistics held constant in the backward pass, and 'layer' per sample: both keep samples apart.")

    @model_validator(mode="after")
    def _sizes_fit(self) -> "ModelConfig":
        frames, pixels = self.video_patch
        problems = []
        if self.num_frames % frames:
            problems.append(f"video_patch frames {frames} does not divide num_frames {self.num_frames}")
        if self.frame_size % pixels:
            problems.append(f"video_patch pixels {pixels} does not divide frame_size {self.frame_size}")
        if self.audio_samples % self.audio_patch:
            problems.append(f"audio_patch {self.audio_patch} does not divide audio_samples {self.audio_samples}")
        if self.d_model % self.num_heads:
            problems.append(f"num_heads {self.num_heads} does not divide d_model {self.d_model}")
        if problems:
            raise ValueError("sizes do not fit: " + "; ".join(problems))
        return self

    @property
    def num_video_tokens(self) -> int:
        frames, pixels = self.video_patch
        return (self.num_frames // frames) * (self.frame_size // pixels) ** 2

    @property
    def num_audio_tokens(self) -> int:
        return self.audio_samples // self.audio_patch


class HarmonizeConfig(Config):
    """Cross-modality gradient harmonization (arXiv 2211.02077), each part switchable."""

    realign: bool = Field(True, description="Project the video-audio and video-text per-sample gradients when they conflict (cosine < 0), PCGrad-style.")
    curriculum: Literal["none", "share", "hard", "soft"] = Field("share", description="Which pairs train. 'share': plain for warmup_fraction of training, then each batch drops its drop_share lowest-scoring, then keeps everything from drop_until on; 'hard' keeps cosine >= gamma(t); 'soft' weighs by sigmoid(kappa * cosine).")
    score: Literal["cosine", "loss", "random", "oracle"] = Field("cosine", description="What ranks a batch for the 'share' curriculum: the conflict score (cosine of the per-sample gradients), the per-pair loss (high is dropped), a random draw at the same rate, or the planted swap flags (drops exactly the corrupted pairs, all through training: the perfect curriculum).")
    target: Literal["pooled", "last_block"] = Field("pooled", description="What the per-sample gradients are taken with respect to (the conflict score and the realignment): the pooled video feature both losses read, or the video tokens entering the shared backbone's last block (one more block in the two small backward passes).")
    unit: Literal["pair", "triplet"] = Field("pair", description="What a drop removes: 'triplet' both of its pairs; 'pair' one pair (for the cosine score: the pair of a low-scoring triplet whose loss stands out more from its batch).")
    warmup_fraction: float = Field(0.2, ge=0, le=1, description="'share': share of training with no dropping (the scores mean nothing before the model fits).")
    drop_share: float = Field(0.3, ge=0, lt=1, description="'share': share of each batch's triplets (or pairs' worth) dropped in the dropping window.")
    drop_until: float = Field(0.8, ge=0, le=1, description="'share': share of training after which everything is kept again (1: drop to the end).")
    gamma_start: float = Field(0.0, ge=-1, le=1, description="'hard': threshold at step 0 (0: conflicting triplets are dropped).")
    anneal_fraction: float = Field(0.4, gt=0, le=1, description="'hard': share of training over which the threshold falls linearly to -1 (all kept).")
    kappa: float = Field(5.0, gt=0, description="'soft': sharpness.")

    @property
    def enabled(self) -> bool:
        return self.realign or self.curriculum != "none"

    @property
    def needs_cosine(self) -> bool:
        """Whether a step must compute the per-sample gradients for this setting."""
        return self.realign or self.curriculum in ("hard", "soft") or (self.curriculum == "share" and self.score == "cosine")


class SyntheticConfig(Config):
    """A corpus whose ground truth is known: a latent class and style drive video, audio and text."""

    write: bool = Field(False, description="Write the corpus (training triplets to data.urls' folder, clean ones to eval.urls') where no shards are; off: missing shards are an error.")
    num_samples: int = Field(2048, ge=16, description="Triplets to write.")
    samples_per_shard: int = Field(256, ge=1, description="Triplets per shard.")
    num_classes: int = Field(8, ge=2, description="Latent classes.")
    num_styles: int = Field(4, ge=1, description="Latent styles (a colour and a motion in the video, an overtone in the audio, words in the text).")
    misaligned: float = Field(0.3, ge=0, le=1, description="Share of video-text pairs whose texts are swapped with another group's, and, drawn independently, of video-audio pairs whose audio is.")
    noise: float = Field(0.5, ge=0, description="Std of the per-modality noise.")
    style_strength: float = Field(1.0, ge=0, le=1.25, description="How strongly the style marks video and audio: the colour's saturation (x 0.8), the flicker's depth (x 0.4), the overtone's amplitude.")
    text_mix: tuple[float, float, float] = Field((0.45, 0.35, 0.2), description="Shares of a text's words drawn from its class's words, its style's words and common words.")
    seed: int = Field(0, description="Seed of the corpus (the same seed gives the same class-to-signal maps and, at any misaligned share, the same clips).")

    @model_validator(mode="after")
    def _mix_sums_to_one(self) -> "SyntheticConfig":
        if abs(sum(self.text_mix) - 1) > 1e-6 or min(self.text_mix) < 0:
            raise ValueError(f"synthetic.text_mix {list(self.text_mix)} must be three non-negative shares that sum to 1")
        return self


class EvalConfig(Config):
    urls: StoragePaths = Field(description="Clean held-out shards (written from `synthetic` with misaligned = 0 on request).")
    batch_size: int = Field(128, ge=2, description="Evaluation batch size.")
    num_samples: int = Field(512, ge=16, description="Clean held-out triplets (misaligned = 0), written beside the training shards.")
    probe_steps: int = Field(300, ge=1, description="Optimizer steps of the linear probe.")


class VattConfig(Config):
    data: DataConfig = Field(description="Training shards (written from `synthetic` on request, synthetic.write=true).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network sizes.")
    harmonize: HarmonizeConfig = Field(default_factory=HarmonizeConfig, description="Gradient harmonization.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Synthetic corpus.")
    eval: EvalConfig = Field(description="Evaluation at the end of the run.")
    run: RunConfig = Field(default_factory=RunConfig, description="Workers, strategy, checkpoints.")
    epochs: int = Field(4, ge=1, description="Passes over the training shards.")
    lr: float = Field(1e-3, gt=0, description="Peak Adam learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup, then cosine decay to lr_end_ratio * lr.")
    lr_end_ratio: float = Field(0.05, ge=0, le=1, description="Final learning rate as a share of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(10, ge=1, description="Steps between measured points: conflict scores without harmonization, the history, the job's gauges.")
    out_dir: StoragePath = Field("vatt/out", description="Where the evaluation JSON and plot go (under the storage root if relative).")

    def sample_bytes(self) -> tuple[int, int]:
        """One triplet's bytes as stored (uint8 video, float16 audio, uint16 word ids) and as collated
        (audio float32, ids int64; video stays uint8 until it is on the device): labtrain.sizing's input."""
        m = self.model
        video = m.num_frames * m.frame_size * m.frame_size * 3
        words = m.text_candidates * m.text_len
        return video + 2 * m.audio_samples + 2 * words, video + 4 * m.audio_samples + 8 * words

    @model_validator(mode="after")
    def _data_fits(self) -> "VattConfig":
        if self.data.batch_size < 2:
            raise ValueError("data.batch_size must be at least 2: contrastive losses need negatives")
        if self.run.strategy == "deepspeed" and self.run.zero_stage == 3:
            # Found on 2 ranks (tests/jobs/vatt/test_job.py): the second autograd.grad failed on a 0-sized weight.
            raise ValueError(
                "run.zero_stage=3 is not supported for VATT: ZeRO-3 frees a module's gathered parameters after a backward pass "
                "through it, and the conflict score takes two partial backward passes through the heads (and, for "
                "harmonize.target=last_block, the last block) before the main one, so the second finds them freed. It runs on "
                "every log_every-th step, with or without harmonization. Use run.zero_stage=1 or 2 (base.yaml uses 1: VATT "
                "Base's parameters and optimizer state fit every GPU), or run.strategy=ddp"
            )
        return self
