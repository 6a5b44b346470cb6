"""Config of the video self-supervised job: clip sampling, the 3-D ResNet, the objective, the corpus, the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from labtrain.config import Config, DataConfig, RunConfig, StoragePath, StoragePaths


class SamplingConfig(Config):
    """How clips are cut from a video: the same video at a slow and a fast frame stride."""

    num_frames: int = Field(8, ge=2, description="Frames per clip, T (paper: 16).")
    slow_stride: int = Field(1, ge=1, description="Frame stride of the slow clip, tau.")
    fast_factor: int = Field(2, ge=2, description="The fast clip's stride is fast_factor * slow_stride (VTHCL: 2 or 4; RSPNet's speeds {1x, fast_factor x}).")
    crop_size: int = Field(28, ge=8, description="Square random crop (center crop at evaluation); even.")
    color_jitter: float = Field(0.4, ge=0, le=1, description="Brightness, contrast and saturation jitter, one draw per clip (consistent within it).")
    channel_shuffle: bool = Field(True, description="Permute the colour channels at random, one permutation per clip (a strong hue jitter: the "
                                  "slow and fast clips of a video must not match by colour alone).")
    grayscale: float = Field(0.3, ge=0, le=1, description="Probability that a clip is turned to grayscale.")
    flip: bool = Field(True, description="Random horizontal flip, one per clip.")
    short_clips: Literal["skip", "pad"] = Field("skip", description="A video with fewer frames than the fast clip spans: 'skip' (counted) or 'pad' (repeat its last frame).")
    eval_clips: int = Field(4, ge=1, description="Clips per video at evaluation (uniformly spaced, slow stride); predictions and features are averaged over them.")

    @property
    def fast_stride(self) -> int:
        return self.slow_stride * self.fast_factor

    def span(self, stride: int) -> int:
        """Frames a clip of ``num_frames`` at ``stride`` covers."""
        return (self.num_frames - 1) * stride + 1


class ModelConfig(Config):
    """A 3-D ResNet (R3D-18 style: BasicBlocks of 3x3x3 convolutions), sized by config."""

    stem_width: int = Field(16, ge=4, description="Channels of the stem convolution (R3D-18: 64).")
    stem_kernel: tuple[int, int] = Field((3, 3), description="Stem kernel (frames, pixels) (R3D-18: (3, 7)).")
    stem_stride: int = Field(1, ge=1, description="Spatial stride of the stem (R3D-18: 2, followed by a max pool).")
    stem_pool: bool = Field(False, description="3x3 spatial max pool after the stem (R3D-18: true).")
    widths: list[int] = Field([16, 32, 64], min_length=2, description="Channels per stage (R3D-18: [64, 128, 256, 512]). Stages after the first halve time and space.")
    blocks: list[int] = Field([1, 1, 1], min_length=2, description="BasicBlocks per stage (R3D-18: [2, 2, 2, 2]).")
    groups: int = Field(8, ge=1, description="GroupNorm groups (per-sample statistics: no batch statistics leak between a query and its key, so MoCo's shuffle-BN is not needed).")

    @model_validator(mode="after")
    def _stages_match(self) -> "ModelConfig":
        if len(self.widths) != len(self.blocks):
            raise ValueError(f"model.widths has {len(self.widths)} stages but model.blocks has {len(self.blocks)}; give one entry per stage")
        bad = [w for w in [self.stem_width, *self.widths] if w % self.groups]
        if bad:
            raise ValueError(f"model.groups={self.groups} does not divide the widths {bad}")
        return self


class ObjectiveConfig(Config):
    """What the encoder learns from. MoCo-style: a momentum key encoder and a queue of negatives per stage."""

    name: Literal["vthcl", "rspnet", "infonce", "supervised"] = Field(
        "vthcl",
        description="'vthcl': InfoNCE between the slow and the fast clip of a video at every stage in `stages`; 'infonce': the same at the last "
        "stage only (the single-stage baseline); 'rspnet': appearance InfoNCE (same-speed and other-speed positives) plus a margin ranking "
        "loss on relative playback speed, at the last stage; 'supervised': cross-entropy on the training videos' labels (the experiment's "
        "oracle arm: what the same backbone and budget reach with labels).",
    )
    stages: list[int] = Field([2, 3], min_length=1, description="Backbone stages (1-based) with a contrastive head (vthcl).")
    dim: int = Field(128, ge=8, description="Embedding width of each head.")
    hidden: int = Field(256, ge=8, description="Hidden width of each head's 2-layer MLP.")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature.")
    queue_size: int = Field(256, ge=0, description="Negatives kept per head (paper: 16384); keys of every rank are enqueued. Keep it well under the "
                            "number of training videos: a queue that spans an epoch holds each video's own earlier key as a negative.")
    momentum: float = Field(0.99, ge=0, lt=1, description="Key encoder momentum (paper: 0.999, for far longer runs).")
    margin: float = Field(1.0, gt=0, description="RSPNet's ranking margin (on dot products of normalized speed embeddings).")
    rank_weight: float = Field(1.0, ge=0, description="Weight of RSPNet's ranking loss against the appearance terms.")


class SyntheticConfig(Config):
    """Moving sprites (METHODS.md 2.4): class = shape x motion pattern; each video's speed, colour, size and
    phase are random, so tempo comes from the frame stride and the class from shape and motion."""

    write: bool = Field(False, description="Write the corpus (H.264 .mp4 clips) where no shards are: training videos to data.urls' folder, labelled held-out ones to eval.urls'.")
    num_videos: int = Field(512, ge=8, description="Training videos.")
    eval_videos: int = Field(256, ge=8, description="Held-out labelled videos (half fit the probe, half score it).")
    samples_per_shard: int = Field(128, ge=1, description="Videos per shard.")
    num_frames: int = Field(32, ge=2, description="Frames per video.")
    frame_size: int = Field(32, ge=8, description="Square frame side (even: H.264 wants even sides).")
    fps: int = Field(16, ge=1, description="Frame rate written in the container.")
    gop: int = Field(8, ge=1, description="Frames between keyframes (what a seek can skip).")
    shapes: int = Field(4, ge=1, le=4, description="Sprite shapes: square, disc, triangle, cross.")
    motions: int = Field(2, ge=1, le=4, description="Motion patterns: horizontal bounce, vertical bounce, circle, diagonal.")
    noise: float = Field(10.0, ge=0, description="Std of the per-pixel noise (0-255 scale).")
    seed: int = Field(0, description="Seed of the corpus.")

    @property
    def num_classes(self) -> int:
        return self.shapes * self.motions


class EvalConfig(Config):
    urls: StoragePaths = Field(description="Labelled held-out shards (written from `synthetic` on request).")
    batch_size: int = Field(64, ge=1, description="Videos per evaluation batch.")
    probe_steps: int = Field(300, ge=1, description="Full-batch optimizer steps of the linear probe on frozen features.")
    finetune_epochs: int = Field(4, ge=0, description="Epochs of the short end-to-end fine-tune (0: none).")
    finetune_lr: float = Field(1e-3, gt=0, description="Fine-tune learning rate (AdamW).")
    random_init: bool = Field(True, description="Also score a randomly initialised backbone of the same shape (the control).")


class VideoSSLConfig(Config):
    data: DataConfig = Field(description="Training shards of .mp4 clips (+ .json metadata); written from `synthetic` on request.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Clip sampling and augmentation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The 3-D ResNet.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="The self-supervised objective.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="The synthetic corpus.")
    eval: EvalConfig = Field(description="Evaluation at the end of the run.")
    run: RunConfig = Field(default_factory=RunConfig, description="Workers, strategy, checkpoints.")
    epochs: int = Field(10, ge=1, description="Passes over the training shards.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="'sgd' (momentum 0.9, the papers' choice) or 'adamw'.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup, then cosine decay to zero.")
    seed: int = Field(0, description="Seed of the initial weights (the same on every rank).")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    image_every: int = Field(200, ge=1, description="Steps between grids of sampled clip frames in TensorBoard.")
    out_dir: StoragePath = Field("video_ssl/out", description="Where the evaluation JSON and plot go (under the storage root if relative).")

    @model_validator(mode="after")
    def _fits(self) -> "VideoSSLConfig":
        problems = []
        s, syn, model = self.sampling, self.synthetic, self.model
        if self.data.batch_size < 2:
            problems.append("data.batch_size must be at least 2: contrastive losses need negatives")
        if s.crop_size % 2:
            problems.append(f"sampling.crop_size={s.crop_size} must be even")
        if syn.write and s.crop_size > syn.frame_size:
            problems.append(f"sampling.crop_size={s.crop_size} is larger than the corpus' frames (synthetic.frame_size={syn.frame_size})")
        if syn.write and s.short_clips == "skip" and s.span(s.fast_stride) > syn.num_frames:
            problems.append(
                f"the fast clip spans {s.span(s.fast_stride)} frames ((num_frames-1) * slow_stride * fast_factor + 1) but the corpus' videos "
                f"have {syn.num_frames} (synthetic.num_frames): every video would be skipped. Lower sampling.num_frames, slow_stride or fast_factor"
            )
        if self.objective.name == "vthcl" and any(not 1 <= i <= len(model.widths) for i in self.objective.stages):
            problems.append(f"objective.stages {self.objective.stages} must name stages 1..{len(model.widths)} of model.widths")
        if syn.write and syn.frame_size % 2:
            problems.append(f"synthetic.frame_size={syn.frame_size} must be even (H.264)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def head_stages(self) -> list[int]:
        """The 1-based stages whose features are contrasted."""
        last = len(self.model.widths)
        if self.objective.name == "supervised":
            return []
        return sorted(set(self.objective.stages)) if self.objective.name == "vthcl" else [last]
