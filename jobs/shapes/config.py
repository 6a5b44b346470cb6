"""Config of the shapes job: a small CNN classifying synthetic shape images streamed from shards."""

from __future__ import annotations

from pydantic import Field

from labtrain.config import Config, DataConfig, RunConfig


class SyntheticConfig(Config):
    """The synthetic corpus: written where data.urls points when those shards are missing and ``write`` is set."""

    write: bool = Field(False, description="Write the corpus to data.urls' folder if no shards are there (never overwrites); off: missing shards are an error.")
    num_samples: int = Field(4096, ge=1, description="Training samples to write.")
    samples_per_shard: int = Field(512, ge=1, description="Samples per shard.")
    image_size: int = Field(16, ge=8, le=128, description="Square image side, pixels.")
    noise: float = Field(0.3, ge=0, description="Std of the Gaussian pixel noise.")
    seed: int = Field(0, description="Seed of the corpus.")


class ModelConfig(Config):
    width: int = Field(16, ge=1, description="Channels of the first conv layer (doubled once).")


class ShapesConfig(Config):
    data: DataConfig = Field(description="Training shards.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="The synthetic corpus (written on request, synthetic.write=true).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network size.")
    run: RunConfig = Field(default_factory=RunConfig, description="Workers, strategy, checkpoints.")
    epochs: int = Field(2, ge=1, description="Passes over the training shards.")
    lr: float = Field(3e-3, gt=0, description="Peak Adam learning rate (cosine decay to 0).")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (None: run every epoch).")
    num_val_samples: int = Field(512, ge=1, description="Held-out samples (generated with another seed) for the final accuracy.")
