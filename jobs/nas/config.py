"""Config of the NAS job: a search space, an evaluator (table or live training), the search, the trials on Ray.

``space`` and ``evaluator`` are tagged by ``kind``; ``search.weaknas.predictor`` by ``kind`` too. Every
field is validated here, and the space is also dry-built (every choice in a network, one forward pass)
before any trial starts (:func:`jobs.nas.model.check_space`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, PositiveInt, Tag, model_validator

from labtrain.config import Config, DataConfig, StoragePath

Method = Literal["weaknas", "random", "evolution"]


def _kind(default: str | None, *kinds: str) -> Discriminator:
    """Tagged unions choose their member by ``kind``; a section without one is the ``default`` kind, so
    ``weaknas.predictor.max_iter=50`` works without restating ``weaknas.predictor.kind=mlp``."""

    def tag(value):
        return value.get("kind", default) if isinstance(value, dict) else getattr(value, "kind", None)

    allowed = ", ".join(kinds)
    return Discriminator(tag, custom_error_type="kind", custom_error_message=f"kind must be one of: {allowed}")


class Nb201SpaceConfig(Config):
    """The NAS-Bench-201 cell space and the size of its macro skeleton (scaled down for live training)."""

    kind: Literal["nb201"] = Field("nb201", description="NAS-Bench-201: 4 nodes, 6 edges, 5 operations (15,625 cells).")
    channels: int = Field(16, ge=1, description="Channels of the first stage (NAS-Bench-201: 16; doubled at each of the 2 reductions).")
    cells_per_stage: int = Field(5, ge=1, description="Cells in each of the 3 stages (NAS-Bench-201: 5).")
    max_candidates: int = Field(15625, ge=1, description="Largest space enumerated as the candidate set; larger ones use a random pool of this size.")


class X3dSpaceConfig(Config):
    """A small 3-D CNN whose stages each choose a block type, width, expansion ratio and attention (AutoX3D)."""

    kind: Literal["x3d"] = Field("x3d", description="Video space in the spirit of AutoX3D (arXiv 2112.04710).")
    num_stages: int = Field(3, ge=1, le=6, description="Stages; each after the first halves the spatial size.")
    block_types: list[Literal["x3d", "res", "r21d"]] = Field(
        ["x3d", "res", "r21d"], min_length=1,
        description="x3d: 1x1x1 expand, depthwise 3x3x3, 1x1x1 project; res: two full 3x3x3 convs; r21d: 1x3x3 then 3x1x1 convs.",
    )
    widths: list[PositiveInt] = Field([8, 12, 16], min_length=1, description="Output channels a stage may choose.")
    expansions: list[PositiveInt] = Field([1, 2, 3], min_length=1, description="Inner-channel expansion ratios a stage may choose.")
    attention: list[Literal["none", "se"]] = Field(["none", "se"], min_length=1, description="Attention blocks a stage may choose (se: squeeze-excitation).")
    se_reduction: int = Field(4, ge=1, description="Channel reduction inside a squeeze-excitation block.")
    stem_channels: int = Field(8, ge=1, description="Channels of the 3-D stem convolution.")
    max_candidates: int = Field(200_000, ge=1, description="Largest space enumerated as the candidate set; larger ones use a seeded random pool of this size.")

    @model_validator(mode="after")
    def _distinct(self) -> "X3dSpaceConfig":
        for name in ("block_types", "widths", "expansions", "attention"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} {values} lists a choice twice; list each choice once")
        return self


class TableEvaluatorConfig(Config):
    """A tabular oracle: a CSV of (architecture string, score) that answers a query by lookup."""

    kind: Literal["table"] = Field("table", description="Look the score up in a table.")
    path: StoragePath = Field(description="CSV with a header; an absolute path, s3://..., or a path under the storage root (LABTRAIN_STORAGE_ROOT, default ./runs).")
    arch_column: str = Field("arch", description="Column of architecture strings.")
    score_column: str = Field("test_accuracy", description="Column of scores (higher is better).")
    seconds_per_query: float = Field(
        0.0, ge=0, le=3600,
        description="Simulated training time: each lookup takes this long, so a table search paces like a live one (for trying the "
        "cluster's scheduling, preemption and the queue on it). Not part of the search's identity: a saved search continues with another value.",
    )


class InputConfig(Config):
    """What the networks are built for, and the synthetic corpus (written where the shards are missing, on request)."""

    write_synthetic: bool = Field(False, description="Write the synthetic corpus where train.urls / val.urls name no shards (never overwrites); off: missing shards are an error.")
    num_classes: int = Field(4, ge=2, description="Classes of the task.")
    channels: int = Field(3, ge=1, description="Input channels.")
    image_size: int = Field(16, ge=1, description="Square frame side, pixels.")
    num_frames: int = Field(4, ge=1, description="Frames per clip (x3d space only).")
    num_train_samples: int = Field(512, ge=1, description="Synthetic training samples (write_synthetic).")
    num_val_samples: int = Field(256, ge=1, description="Synthetic validation samples (write_synthetic).")
    samples_per_shard: int = Field(128, ge=1, description="Samples per synthetic shard.")
    noise: float = Field(0.5, ge=0, description="Std of the Gaussian pixel noise of the synthetic corpus.")
    seed: int = Field(0, description="Seed of the synthetic corpus.")


class TrainEvaluatorConfig(Config):
    """Live training: build the network, train it briefly on streamed shards, score = validation accuracy."""

    kind: Literal["train"] = Field("train", description="Train each architecture and report its validation accuracy (0..1).")
    train: DataConfig = Field(description="Training shards (npy image (C,H,W) or clip (C,T,H,W) float, cls label).")
    val: DataConfig = Field(description="Validation shards, same format.")
    input: InputConfig = Field(default_factory=InputConfig, description="Input shape, classes and the synthetic corpus.")
    epochs: int = Field(1, ge=1, description="Passes over the training shards per trial.")
    lr: float = Field(0.1, gt=0, description="Peak SGD learning rate, cosine decay to 0 (NAS-Bench-201: 0.1).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Nesterov momentum (NAS-Bench-201: 0.9).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (NAS-Bench-201: 5e-4).")


class MlpPredictorConfig(Config):
    kind: Literal["mlp"] = Field("mlp", description="scikit-learn MLPRegressor (the WeakNAS default predictor).")
    hidden_sizes: list[PositiveInt] = Field([1000, 1000, 1000, 1000], min_length=1, description="Hidden layer widths (WeakNAS: 4 x 1000; narrower ones rank worse, see the job README).")
    max_iter: int = Field(100, ge=1, description="Adam epochs (WeakNAS: 100).")


class GbtPredictorConfig(Config):
    kind: Literal["gbt"] = Field("gbt", description="scikit-learn GradientBoostingRegressor (WeakNAS also runs XGBoost gbtree).")
    num_trees: int = Field(200, ge=1, description="Boosting rounds.")
    max_depth: int = Field(4, ge=1, description="Depth of each tree.")
    learning_rate: float = Field(0.1, gt=0, description="Shrinkage.")


class RfPredictorConfig(Config):
    kind: Literal["rf"] = Field("rf", description="scikit-learn RandomForestRegressor.")
    num_trees: int = Field(200, ge=1, description="Trees (WeakNAS: 1000).")
    max_depth: int | None = Field(10, ge=1, description="Depth limit (WeakNAS: 10); None grows full trees.")


PredictorConfig = Annotated[
    Annotated[MlpPredictorConfig, Tag("mlp")] | Annotated[GbtPredictorConfig, Tag("gbt")] | Annotated[RfPredictorConfig, Tag("rf")], _kind("mlp", "mlp", "gbt", "rf")
]
SpaceConfig = Annotated[Annotated[Nb201SpaceConfig, Tag("nb201")] | Annotated[X3dSpaceConfig, Tag("x3d")], _kind("nb201", "nb201", "x3d")]
EvaluatorConfig = Annotated[Annotated[TableEvaluatorConfig, Tag("table")] | Annotated[TrainEvaluatorConfig, Tag("train")], _kind(None, "table", "train")]


class WeakNasConfig(Config):
    """WeakNAS (arXiv 2102.10490): refit a weak predictor on all queried, sample inside its predicted top-K."""

    num_initial: int = Field(10, ge=1, description="Random architectures queried first (M0; NAS-Bench-201: 10).")
    num_per_iteration: int = Field(10, ge=1, description="Architectures sampled per predictor fit (M = 10).")
    top_k_start: int = Field(100, ge=1, description="Size of the predicted top region at the first iteration (K = 100).")
    top_k_end: int = Field(100, ge=1, description="Size it decays to (100: no decay, the paper's default).")
    top_k_decay: float = Field(0.96, gt=0, le=1, description="K shrinks by this factor per iteration of M queries, down to top_k_end.")
    predictor: PredictorConfig = Field(default_factory=MlpPredictorConfig, description="The weak predictor, fitted on z-scored labels of queried architectures only.")


class EvolutionConfig(Config):
    """Regularised evolution (aging evolution; NAS-Bench-201's REA settings)."""

    population: int = Field(10, ge=2, description="Population size; the oldest member dies when a child is added.")
    tournament: int = Field(3, ge=1, description="Members sampled per tournament; the best one is mutated.")


class SearchConfig(Config):
    methods: list[Method] = Field(["weaknas"], min_length=1, description="Searches run one after another, each with its own budget: weaknas, random, evolution.")
    budget: int = Field(100, ge=1, description="Trials (distinct architectures evaluated) per method.")
    seed: int = Field(0, description="Seed of the searches (each method derives its own stream).")
    weaknas: WeakNasConfig = Field(default_factory=WeakNasConfig, description="WeakNAS settings.")
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig, description="Regularised evolution settings.")

    @model_validator(mode="after")
    def _distinct(self) -> "SearchConfig":
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} lists a method twice")
        return self


class TrialsConfig(Config):
    """How trials run on Ray: one task per evaluation, with its own resources."""

    max_concurrent: int = Field(4, ge=1, description="Trials in flight at once.")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved per trial (also its torch threads).")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial.")
    resources_per_trial: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per trial, e.g. {'labtrain_node': 0.5}.")
    max_retries: int = Field(2, ge=0, description="Reruns of a trial whose worker process or node died; after that it is recorded as failed.")
    retry_exceptions: bool = Field(False, description="Also rerun trials that raised (off: an error is recorded as a failed trial at once).")
    spread: bool = Field(True, description="Spread trials over the nodes (Ray's SPREAD scheduling) instead of packing them.")


class NasConfig(Config):
    name: str = Field("nas", pattern=r"^[A-Za-z0-9_.-]+$", description="Search name; outputs and the resumable state go to <output>/<name>.")
    output: StoragePath = Field("nas", description="Output root: an absolute path or a path under the storage root (LABTRAIN_STORAGE_ROOT, default ./runs).")
    space: SpaceConfig = Field(default_factory=Nb201SpaceConfig, description="The search space (kind: nb201 or x3d).")
    evaluator: EvaluatorConfig = Field(description="How a query is answered (kind: table or train).")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Which searches, their budget and settings.")
    trials: TrialsConfig = Field(default_factory=TrialsConfig, description="Ray resources, concurrency and retries of the trials.")
