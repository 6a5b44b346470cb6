"""Config of the GAN job: the image corpora, StyleGAN2 (tiny to paper size), ADA, InsGen, FID_domain/KID, the run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from labtrain.config import Config, DataConfig, RunConfig, StoragePath, StoragePaths


class ImagesConfig(Config):
    """What the job trains on: square RGB images of ``resolution``; what happens to other ones."""

    resolution: int = Field(16, ge=8, description="Side of the images G makes and D reads (a power of two).")
    wrong_size: Literal["resize", "skip"] = Field("resize", description="An image of another size: 'resize' (bicubic, to a square) or 'skip' (counted).")
    wrong_mode: Literal["convert", "skip"] = Field("convert", description="An image that is not RGB (grayscale, palette, RGBA): 'convert' or 'skip' (counted).")
    xflip: bool = Field(False, description="Random horizontal flips of the training images (dataset augmentation, as --mirror).")


class CorpusConfig(Config):
    """The two corpora, each written to shards by an explicit switch: 'shapes', coloured shapes with
    ``modes`` known modes at random positions (METHODS.md 4.5), and 'digits', scikit-learn's 1,797 real
    8x8 handwritten digits (resized; 10 classes)."""

    write: bool = Field(False, description="Write the corpus where no shards are: training images to data.urls' folder, held-out ones to eval.urls'.")
    kind: Literal["shapes", "digits", "labelmaps"] = Field("shapes", description="Which corpus to write ('labelmaps': pix2pixHD's pairs).")
    num_images: int = Field(100, ge=8, description="Training images (the limited-data regime InsGen targets: 100 to 2k).")
    eval_images: int = Field(2000, ge=64, description="Held-out real images: the first half trains the FID_domain extractor, the second is FID's reference.")
    modes: int = Field(10, ge=2, le=10, description="Modes of the shapes corpus (shape x colour, METHODS.md 4.5: K = 10).")
    samples_per_shard: int = Field(100, ge=1, description="Images per shard.")
    seed: int = Field(0, description="Seed of the corpus.")


class ModelConfig(Config):
    """``arch``: 'stylegan2' (unconditional, below) or 'pix2pixhd' (label map -> image; its sizes are in the
    ``pix2pixhd`` section). StyleGAN2 (config-f layout): a mapping network, a synthesis network of modulated convolutions with
    noise inputs from a learned 4x4 constant, skip-connected toRGB; a residual discriminator with minibatch
    standard deviation. Every layer has an equalised learning rate."""

    arch: Literal["stylegan2", "pix2pixhd"] = Field("stylegan2", description="'stylegan2': z -> image (ADA, InsGen, GenDA); 'pix2pixhd': label map -> image (paired shards).")
    z_dim: int = Field(64, ge=2, description="Latent z width (paper: 512).")
    w_dim: int = Field(64, ge=2, description="Intermediate latent w width (paper: 512).")
    mapping_layers: int = Field(2, ge=1, description="Mapping network depth (paper: 8; ADA's auto config: 2).")
    mapping_lr_mul: float = Field(0.01, gt=0, description="Learning-rate multiplier of the mapping network.")
    g_channels: int = Field(64, ge=4, description="Synthesis channels at 4x4, halved per doubling of resolution (paper: 512, capped).")
    d_channels: int = Field(64, ge=4, description="Discriminator channels at 4x4, halved per doubling of resolution.")
    min_channels: int = Field(16, ge=1, description="Floor of the channel halving.")
    mbstd_group: int = Field(4, ge=1, description="Minibatch standard deviation group size (must divide each rank's batch).")
    style_mixing: float = Field(0.9, ge=0, le=1, description="Probability of style mixing regularisation.")


class LossConfig(Config):
    """Non-saturating logistic loss, lazy R1 on real images, generator EMA (StyleGAN2-ADA)."""

    lr: float = Field(0.0025, gt=0, description="Adam learning rate of G and D, betas (0, 0.99), eps 1e-8.")
    r1_gamma: float = Field(0.01, ge=0, description="R1 weight gamma: (gamma/2)|grad D(x)|^2 (ADA's cifar: 0.01; paper256: 1).")
    r1_every: int = Field(16, ge=1, description="Lazy R1: every this many minibatches, its loss multiplied by it; D's lr and betas are adjusted (c = I/(I+1)).")
    ema_kimg: float | None = Field(None, gt=0, description="G EMA half-life in thousands of images (None: batch * 10/32, ADA's auto).")
    ema_rampup: float | None = Field(0.05, ge=0, description="EMA ramp-up: the half-life is at most this share of the images seen (None: off).")


class AdaConfig(Config):
    """Adaptive discriminator augmentation: translation, x-flip and colour (DiffAugment-style ops, the cheap
    stand-in METHODS.md 4.5 names for ADA's full pipeline) applied to every image D sees, each with
    probability p; p follows r_t = E[sign(D(real))] towards ``target``."""

    enabled: bool = Field(True, description="Augment D's inputs (with p fixed at p_init when adaptive is false).")
    adaptive: bool = Field(True, description="Adjust p every `interval` minibatches: p += sign(r_t - target) * images / (kimg * 1000).")
    target: float = Field(0.6, gt=0, lt=1, description="Target of the overfitting heuristic r_t.")
    interval: int = Field(4, ge=1, description="Minibatches between adjustments.")
    kimg: float = Field(500, gt=0, description="Thousands of images over which p can move by 1 (paper: 500; short CPU runs need far fewer).")
    p_init: float = Field(0.0, ge=0, le=1, description="Initial augmentation probability.")
    translation: float = Field(0.125, ge=0, le=0.5, description="Largest translation, as a share of the side (zero padded).")
    color: bool = Field(True, description="Brightness, saturation and contrast.")


class InsGenConfig(Config):
    """InsGen (arXiv 2106.04566): instance discrimination on D's features for real and fake images, with a
    momentum D as key encoder, queues of negatives, noise-perturbed fake positives and a G diversity term."""

    enabled: bool = Field(False, description="Add InsGen's losses to the ADA baseline.")
    dim: int = Field(128, ge=4, description="Embedding width of the heads (MLP feat -> feat -> ReLU -> dim, L2-normalised).")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature.")
    momentum: float = Field(0.999, ge=0, lt=1, description="Momentum of D_ema and of the heads' momentum copies.")
    real_queue: int | None = Field(None, ge=1, description="Negatives of the real head (None: max(5% of the training images, the global batch)).")
    fake_queue: int | None = Field(None, ge=1, description="Negatives of the fake head (None: as real_queue).")
    noise_std: float = Field(0.15, ge=0, description="Std of the latent perturbation delta of a fake image's positive, G(z + delta).")
    real_weight: float = Field(1.0, ge=0, description="Weight of the real instance discrimination loss (D phase).")
    fake_weight: float = Field(1.0, ge=0, description="Weight of the fake instance discrimination loss (D phase).")
    g_weight: float = Field(0.1, ge=0, description="Weight of the generator diversity term (G phase, fake head frozen).")


class Pix2PixHDConfig(Config):
    """pix2pixHD (arXiv 1711.11585, NVIDIA/pix2pixHD): the global generator and ``num_d`` PatchGAN
    discriminators at scales 1, 1/2, ...; LSGAN, feature matching, no VGG loss (no pretrained VGG here)."""

    label_classes: int = Field(4, ge=2, description="Classes of the label maps (one-hot channels of G's and D's input).")
    ngf: int = Field(64, ge=4, description="G's channels after the first 7x7 convolution, doubled per downsampling (code: 64).")
    n_downsample: int = Field(3, ge=1, description="G's stride-2 downsamplings (global G: 3; each needs the side to halve cleanly).")
    n_blocks: int = Field(9, ge=0, description="ResNet blocks at G's bottleneck (global G: 9).")
    ndf: int = Field(64, ge=4, description="Each D's first-layer channels, doubled per layer up to 512.")
    n_layers_d: int = Field(3, ge=1, description="Stride-2 convolutions of each PatchGAN D (code: 3), then two stride-1 ones.")
    num_d: int = Field(2, ge=1, description="Discriminator scales (code default 2; the paper uses 3); each sees the input average-pooled once more.")
    feat_match: bool = Field(True, description="Feature-matching loss: L1 between D's features of real and fake at every scale and layer but the last.")
    lambda_feat: float = Field(10.0, ge=0, description="Weight of feature matching (each term: lambda_feat x 4/(n_layers_d+1) / num_d).")
    lr: float = Field(0.0002, gt=0, description="Adam learning rate of G and D, betas (0.5, 0.999).")
    decay_from: float = Field(0.5, ge=0, le=1, description="Share of the epochs at constant lr; the rest decays linearly to zero (code: 100 + 100 epochs).")


class GenDAConfig(Config):
    """GenDA one-shot adaptation (arXiv 2111.09876, METHODS.md 4.3): from a trained StyleGAN2 checkpoint, G and D
    are frozen; an attribute adaptor w' = a*w + b (a=1, b=0 at the start) and a linear classifier on D's frozen
    features are trained adversarially against ONE target image, with truncation psi < 1 during training as the
    diversity constraint. ``method: finetune`` is the baseline: all of G and D fine-tuned on the same image."""

    source: StoragePath | None = Field(None, description="The source run's checkpoint directory (a Ray Train checkpoint_* folder of a stylegan2 run); required with mode=genda.")
    target: str | None = Field(None, description="The one target image (PNG/JPEG, resized to images.resolution); required with mode=genda.")
    method: Literal["adaptor", "finetune"] = Field("adaptor", description="'adaptor': GenDA; 'finetune': the plain fine-tuning baseline.")
    steps: int = Field(300, ge=1, description="Adaptation steps.")
    batch_size: int = Field(16, ge=1, description="Generated images per step (the one target image is repeated to match).")
    lr: float = Field(0.002, gt=0, description="Adam learning rate of what is trained.")
    truncation: float = Field(0.7, gt=0, le=1, description="psi of w = w_avg + psi (w - w_avg) during adaptation (1: off; the adaptor method only); never at test.")
    augment_p: float = Field(0.5, ge=0, le=1, description="Probability of ADA's x-flip and of its translation on each image D sees (fixed; no colour ops: colour may be the attribute).")


class EvalConfig(Config):
    """FID_domain and KID (torchmetrics) over a feature extractor trained here on held-out real images,
    saved with its hash, and mode coverage from the same classifier."""

    urls: StoragePaths = Field(description="Held-out real images with labels (written from `corpus` on request).")
    every: int = Field(200, ge=1, description="Steps between evaluations (and sample grids) during training.")
    num_generated: int = Field(1000, ge=16, description="Generated images per evaluation (G_ema, fixed latents); compare runs only at equal N.")
    extractor: Literal["domain", "inception"] = Field("domain", description="'domain': FID_domain, the classifier trained here; 'inception': torchmetrics' "
                                                      "InceptionV3 FID from the local weights file `inception_weights` (needs torch-fidelity).")
    inception_weights: str | None = Field(None, description="Local FID Inception weights (pt_inception-2015-12-05); required with extractor=inception.")
    extractor_steps: int = Field(400, ge=1, description="Adam steps of the domain extractor (fixed seed 0).")
    extractor_path: StoragePath | None = Field(None, description="Where the domain extractor's weights are (trained and written there if missing); "
                                               "None: fid_domain.pt beside the held-out shards (in out_dir when they are on S3). Runs compared share it.")
    kid_subsets: int = Field(100, ge=1, description="KID subsets (clean-fid: 100).")
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size (at most the smaller set).")
    coverage_min_share: float = Field(0.2, gt=0, le=1, description="A mode is covered when at least this share of a uniform 1/K of the samples is classified into it.")
    quality_threshold: float = Field(0.9, gt=0, lt=1, description="A sample is high-quality when the classifier's top probability exceeds this.")


class GANConfig(Config):
    data: DataConfig = Field(description="Training shards of images (<key>.png, <key>.cls); written from `corpus` on request.")
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="Image size and the policy for other sizes and modes.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="The corpora.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="G and D.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Losses, regularisation, optimizers, EMA.")
    ada: AdaConfig = Field(default_factory=AdaConfig, description="Adaptive discriminator augmentation.")
    insgen: InsGenConfig = Field(default_factory=InsGenConfig, description="InsGen's instance discrimination.")
    pix2pixhd: Pix2PixHDConfig = Field(default_factory=Pix2PixHDConfig, description="pix2pixHD's G and D (model.arch=pix2pixhd).")
    mode: Literal["train", "genda"] = Field("train", description="'train': train the model from scratch; 'genda': adapt a trained stylegan2 run to one target image.")
    genda: GenDAConfig = Field(default_factory=GenDAConfig, description="GenDA's one-shot adaptation (mode=genda).")
    eval: EvalConfig = Field(description="FID_domain, KID and mode coverage.")
    run: RunConfig = Field(default_factory=RunConfig, description="Workers, strategy, checkpoints.")
    epochs: int = Field(200, ge=1, description="Passes over the training images.")
    seed: int = Field(0, description="Seed of the initial weights (the same on every rank) and of the evaluation latents.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    out_dir: StoragePath = Field("gan/out", description="Where the evaluation JSON, plots and sample grids go (under the storage root if relative).")

    @model_validator(mode="after")
    def _fits(self) -> "GANConfig":
        problems = []
        res, run = self.images.resolution, self.run
        if res & (res - 1):
            problems.append(f"images.resolution={res} must be a power of two")
        if self.data.batch_size % self.model.mbstd_group:
            problems.append(f"model.mbstd_group={self.model.mbstd_group} must divide data.batch_size={self.data.batch_size} (each rank's batch)")
        if run.strategy != "ddp":
            why = ("its G phase reads D's plain module with D frozen, and D's step scores the same pairs" if self.model.arch == "pix2pixhd" else
                   "its lazy R1 differentiates D's gradient (a double backward), and its G phase reads D without updating it")
            problems.append(f"run.strategy={run.strategy}: the GAN job runs on ddp only: {why}; DeepSpeed's engines (whose ZeRO stages partition "
                            "the parameters a plain module would read) and Accelerate's wrapped models are not built for that. Use run.strategy=ddp")
        if run.precision != "fp32":
            what = "LSGAN and feature matching" if self.model.arch == "pix2pixhd" else "R1's gradient penalty"
            problems.append(f"run.precision={run.precision}: the GAN job trains in fp32 ({what} under bf16 autocast is not validated). Use run.precision=fp32")
        if run.accumulate_batches != 1:
            problems.append("run.accumulate_batches must be 1: each minibatch is a G step and a D step")
        if self.eval.extractor == "inception" and not self.eval.inception_weights:
            problems.append("eval.extractor=inception needs eval.inception_weights, the path of a local FID Inception weights file")
        if self.model.arch == "pix2pixhd":
            if self.insgen.enabled or self.mode == "genda":
                problems.append("model.arch=pix2pixhd: InsGen and GenDA are StyleGAN2's; set insgen.enabled=false and mode=train")
            if self.corpus.write and self.corpus.kind != "labelmaps":
                problems.append(f"model.arch=pix2pixhd trains on (label map, image) pairs: corpus.kind={self.corpus.kind} has no label maps; use corpus.kind=labelmaps")
            if res % 2 ** self.pix2pixhd.n_downsample:
                problems.append(f"images.resolution={res} must be divisible by 2^pix2pixhd.n_downsample={2 ** self.pix2pixhd.n_downsample}")
        elif self.corpus.write and self.corpus.kind == "labelmaps":
            problems.append("corpus.kind=labelmaps is pix2pixHD's paired corpus; use model.arch=pix2pixhd, or corpus.kind=shapes|digits for stylegan2")
        if self.mode == "genda":
            missing = [name for name in ("source", "target") if getattr(self.genda, name) is None]
            if missing:
                problems.append(f"mode=genda needs {' and '.join('genda.' + m for m in missing)}: the source run's checkpoint folder and the one target image")
            if self.genda.batch_size % self.model.mbstd_group:
                problems.append(f"model.mbstd_group={self.model.mbstd_group} must divide genda.batch_size={self.genda.batch_size}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def queue_sizes(self, num_images: int, global_batch: int) -> tuple[int, int]:
        """The real and fake heads' queue lengths (InsGen: 5% of the training set; here at least a global batch)."""
        default = max(int(0.05 * num_images), global_batch)
        return self.insgen.real_queue or default, self.insgen.fake_queue or self.insgen.real_queue or default
