"""The image corpora (written to shards as PNG by an explicit switch) and the decoder that reads any PNG/JPEG.

Shapes (METHODS.md 4.5): ``modes`` known modes, each a (shape, colour) pair, drawn at a random position and
size on a dark background with a little noise; the label is the mode, so a classifier trained on held-out
images tells which modes a generator covers. Digits: scikit-learn's 1,797 real 8x8 handwritten digits,
upsampled and coloured white on black (labels 0-9), first shuffled and split into training and held-out.

Each sample is ``<key>.png`` and ``<key>.cls``. The decoder turns a sample into a (3, R, R) float tensor in
[-1, 1]; an image of another size or mode is resized/converted or skipped (``images.wrong_size``,
``images.wrong_mode``): a skip raises, and the data path skips the sample and counts it.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from jobs.gan.config import CorpusConfig, ImagesConfig

SHAPES = ("square", "disc", "triangle", "cross", "ring")
COLOURS = ((255, 80, 80), (80, 160, 255))  # modes = shape x colour, mode m: SHAPES[m // 2], COLOURS[m % 2]


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        arm = max(r / 3, 0.75)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    d2 = dx**2 + dy**2
    return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)  # ring


def render_shape(mode: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``mode``."""
    shape, colour = SHAPES[mode // len(COLOURS)], np.array(COLOURS[mode % len(COLOURS)], np.float64)
    r = rng.uniform(0.22, 0.3) * size
    cy, cx = rng.uniform(r + 0.5, size - r - 0.5, 2)
    image = np.full((size, size, 3), rng.uniform(20, 40), np.float64)
    image[_shape_mask(shape, size, cy, cx, r)] = colour * rng.uniform(0.85, 1.0)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def shapes(count: int, size: int, modes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, size, size, 3) uint8 of modes drawn uniformly, and their labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(modes, size=count)
    return np.stack([render_shape(int(m), size, rng) for m in labels]), labels


def digits(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1,797 real scans, 8x8, 17 grey levels), bicubic to ``size``, white on black RGB, shuffled."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    images = []
    for image in bunch.images[order]:
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8), mode="L").resize((size, size), Image.BICUBIC)
        images.append(np.repeat(np.asarray(grey)[:, :, None], 3, axis=2))
    return np.stack(images), bunch.target[order]


# pix2pixHD's pairs: the label map (class per pixel) and its rendering, each class a texture tied to its object
# (stripes from the object's top edge, a checker from its corner, brightness rising with the distance from its
# edge), so the image follows from the map only through spatial context a generator has to learn
LABEL_COLOURS = ((30, 34, 48), (220, 70, 60), (60, 190, 90), (240, 200, 60), (150, 90, 220), (70, 200, 220), (230, 120, 200), (200, 200, 200))


def _texture(cls: int, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """(H, W, 3) float: class ``cls``'s texture over ``mask`` (its object), relative to the object's own extent."""
    from scipy.ndimage import distance_transform_edt

    ys, xs = np.nonzero(mask)
    y, x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    kind = cls % 3
    if kind == 1:  # stripes, 2 px on / 2 px off from the object's top edge
        gain = np.where(((y - ys.min()) // 2) % 2 == 0, 1.0, 0.55)
    elif kind == 2:  # a 3-px checker from the object's top-left corner
        gain = np.where((((y - ys.min()) // 3) + ((x - xs.min()) // 3)) % 2 == 0, 1.0, 0.6)
    else:  # brighter with the distance from the edge
        gain = 0.5 + 0.5 * np.clip(distance_transform_edt(mask) / 4.0, 0, 1)
    return gain[..., None] * colour


def labelmaps(count: int, size: int, classes: int, seed: int, *, noise: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` pairs: label maps (N, size, size) uint8 of ``classes`` classes (0: the background, a vertical
    gradient), 1-3 objects each (rectangles and discs of classes 1..C-1, later ones in front), their renderings
    (N, size, size, 3) uint8 with Gaussian noise of std ``noise``, and the same renderings without noise (what a
    perfect generator would make: the experiment's oracle)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    maps, images, clean = [], [], []
    for _ in range(count):
        label = np.zeros((size, size), np.uint8)
        image = (0.6 + 0.4 * y / size)[..., None] * np.array(LABEL_COLOURS[0], np.float64)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, classes))
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            hy, hx = rng.uniform(0.12, 0.3, 2) * size
            mask = (np.abs(y - cy) <= hy) & (np.abs(x - cx) <= hx) if rng.random() < 0.5 else ((y - cy) / hy) ** 2 + ((x - cx) / hx) ** 2 <= 1
            if not mask.any():
                continue
            label[mask] = cls
            image[mask] = _texture(cls, mask, np.array(LABEL_COLOURS[cls % len(LABEL_COLOURS)], np.float64))[mask]
        maps.append(label)
        clean.append(np.clip(image, 0, 255).round().astype(np.uint8))
        images.append(np.clip(image + rng.normal(0, noise, image.shape), 0, 255).round().astype(np.uint8))
    return np.stack(maps), np.stack(images), np.stack(clean)


def png(image_HWC: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image_HWC).save(out, format="PNG")
    return out.getvalue()


def corpus(corpus_cfg: CorpusConfig, size: int, *, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
    """The training (or held-out) images and labels of the configured corpus."""
    c = corpus_cfg
    if c.kind == "shapes":
        count = c.eval_images if heldout else c.num_images
        return shapes(count, size, c.modes, seed=c.seed * 2 + int(heldout) + 1000)
    images, labels = digits(size, c.seed)
    if c.num_images + c.eval_images > len(labels):
        raise ValueError(f"the digits corpus has {len(labels)} images: corpus.num_images + corpus.eval_images = {c.num_images + c.eval_images} do not fit")
    return (images[c.num_images:c.num_images + c.eval_images], labels[c.num_images:c.num_images + c.eval_images]) if heldout else (images[:c.num_images], labels[:c.num_images])


def samples(corpus_cfg: CorpusConfig, size: int, *, heldout: bool, classes: int = 4) -> Iterator[dict]:
    """The corpus as shard samples for the shard writer: PNG + label, or (labelmaps) PNG + the label map as a
    greyscale PNG (``<key>.label.png``, one class per grey level)."""
    prefix = "h" if heldout else "t"
    if corpus_cfg.kind == "labelmaps":
        c = corpus_cfg
        maps, images, _ = labelmaps(c.eval_images if heldout else c.num_images, size, classes, seed=c.seed * 2 + int(heldout) + 2000)
        for i, (label, image) in enumerate(zip(maps, images)):
            yield {"__key__": f"{prefix}{i:07d}", "png": png(image), "label.png": png(label)}
        return
    images, labels = corpus(corpus_cfg, size, heldout=heldout)
    for i, (image, label) in enumerate(zip(images, labels)):
        yield {"__key__": f"{prefix}{i:07d}", "png": png(image), "cls": int(label)}


class ImageDecoder:
    """A webdataset sample (``png``/``jpg``/``jpeg`` bytes, optional ``cls``) -> ``image`` (3, R, R) float in [-1, 1]
    and ``label`` (-1 when there is none). Raises on an image the policy skips: the data path counts it."""

    def __init__(self, images: ImagesConfig, *, train: bool = True):
        self.cfg = images
        self.train = train

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        raw = next((sample[k] for k in ("png", "jpg", "jpeg") if k in sample), None)
        if raw is None:
            raise ValueError(f"image {key} has no .png/.jpg (found {', '.join(k for k in sample if not k.startswith('__')) or 'nothing'})")
        image = Image.open(io.BytesIO(raw))
        image.load()
        res = self.cfg.resolution
        if image.mode != "RGB":
            if self.cfg.wrong_mode == "skip":
                raise ValueError(f"image {key} is {image.mode}, not RGB (skipped: images.wrong_mode=skip; 'convert' converts it)")
            image = image.convert("RGB")
        if image.size != (res, res):
            if self.cfg.wrong_size == "skip":
                raise ValueError(f"image {key} is {image.size[0]}x{image.size[1]}, not {res}x{res} (skipped: images.wrong_size=skip; 'resize' resizes it)")
            image = image.resize((res, res), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        if self.train and self.cfg.xflip and np.random.default_rng(sample.get("__seed__", 0)).random() < 0.5:
            tensor = tensor.flip(-1)
        raw_label = sample.get("cls")
        label = int(raw_label.decode() if isinstance(raw_label, bytes) else raw_label) if raw_label is not None else -1
        return {"image": tensor, "label": label}


class PairDecoder:
    """A pix2pixHD sample (``png``/``jpg`` image and ``label.png``, a greyscale map of class indices) -> ``image``
    (3, R, R) in [-1, 1] and ``label_map`` (C, R, R) one-hot. The image follows ``images``' policy; a map of
    another size is resized with nearest neighbours (classes must not blend) or skipped with the image's
    policy; a missing map or a class >= C raises (the data path skips the sample and counts it)."""

    def __init__(self, images: ImagesConfig, classes: int, *, train: bool = True):
        self.image = ImageDecoder(images.model_copy(update={"xflip": False}), train=False)
        self.cfg, self.classes, self.train = images, classes, train

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        image = self.image(sample)["image"]
        raw = sample.get("label.png")
        if raw is None:
            raise ValueError(f"pair {key} has no label map (<key>.label.png); pix2pixHD's shards hold the image and its map")
        label = Image.open(io.BytesIO(raw))
        label.load()
        if label.mode not in ("L", "P"):
            raise ValueError(f"pair {key}: the label map is {label.mode}; it must be a greyscale or palette PNG of class indices")
        res = self.cfg.resolution
        if label.size != (res, res):
            if self.cfg.wrong_size == "skip":
                raise ValueError(f"pair {key}: the label map is {label.size[0]}x{label.size[1]}, not {res}x{res} (skipped: images.wrong_size=skip)")
            label = label.resize((res, res), Image.NEAREST)
        index = torch.from_numpy(np.asarray(label, dtype=np.int64).copy())
        if int(index.max()) >= self.classes:
            raise ValueError(f"pair {key}: the label map has class {int(index.max())}, but pix2pixhd.label_classes={self.classes}")
        one_hot = torch.nn.functional.one_hot(index, self.classes).permute(2, 0, 1).float()
        if self.train and self.cfg.xflip and np.random.default_rng(sample.get("__seed__", 0)).random() < 0.5:
            image, one_hot = image.flip(-1), one_hot.flip(-1)
        return {"image": image, "label_map": one_hot}


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8 (what a PNG of the image holds)."""
    return ((images_BCHW.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
