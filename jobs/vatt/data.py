"""The synthetic multimodal corpus and the job's pipeline pieces (validation, tensors).

Ground truth is known: a latent class y and style s drive all three modalities through fixed random maps
(seeded by ``synthetic.seed``):
- video: a class pattern drifting at a class velocity, in the style's colour and flickering at the style's rate, plus noise;
- audio: a class chord, a style overtone, plus noise;
- text: ``text_candidates`` candidate texts per clip, each drawn from the class's words, the style's words and common words.
Texts and audio are swapped independently: a share ``misaligned`` of clips gets the texts of a clip of another
(class, style) group, and, drawn apart, the same share gets another group's audio. The flags are stored with the
sample, so the curriculum's choices and the conflict score can be scored against them. The swaps draw from their
own random stream: the same seed gives the same clips at every misaligned share (the clean corpus is the
oracle arm of the experiment).
"""

from __future__ import annotations

import colorsys
from typing import Iterator

import numpy as np
import torch

from jobs.vatt.config import ModelConfig, SyntheticConfig

REQUIRED = ("video.npy", "audio.npy", "text.npy", "cls", "json")


class Corpus:
    """The fixed class/style -> signal maps of one corpus seed."""

    def __init__(self, syn: SyntheticConfig, model: ModelConfig):
        rng = np.random.default_rng(syn.seed)
        size, k = model.frame_size, syn.num_classes
        yy, xx = np.mgrid[0:size, 0:size] / size
        freqs = rng.uniform(1, 4, (k, 2, 2))
        self.patterns = np.stack([np.sin(2 * np.pi * (f[0, 0] * yy + f[0, 1] * xx)) * np.cos(2 * np.pi * (f[1, 0] * yy - f[1, 1] * xx)) for f in freqs])
        self.velocity = rng.integers(-2, 3, (k, 2))
        hue0 = rng.uniform()
        self.tints = np.array([colorsys.hsv_to_rgb((hue0 + i / syn.num_styles) % 1, 0.8 * syn.style_strength, 1.0) for i in range(syn.num_styles)])  # colours spread round the hue circle
        self.flicker = np.arange(syn.num_styles) % 4 / 2  # style brightness cycles per clip: 0, 0.5, 1, 1.5
        t = np.arange(model.audio_samples) / model.audio_samples
        self.chords = np.stack([np.sin(2 * np.pi * rng.uniform(20, 120) * t) + np.sin(2 * np.pi * rng.uniform(20, 120) * t) for _ in range(k)])
        self.overtones = np.stack([np.sin(2 * np.pi * rng.uniform(150, 250) * t) for _ in range(syn.num_styles)])
        words = rng.permutation(np.arange(1, model.vocab_size))
        groups = np.array_split(words, k + syn.num_styles + 1)  # one word group per class, per style, and common words
        self.class_words, self.style_words, self.common_words = groups[:k], groups[k:-1], groups[-1]
        self.syn, self.model = syn, model

    def triplet(self, y: int, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, noise = self.model, self.syn.noise
        phase = np.arange(m.num_frames) / m.num_frames
        brightness = 1 + 0.4 * self.syn.style_strength * np.sin(2 * np.pi * self.flicker[s] * phase + rng.uniform(0, 2 * np.pi))
        frames = [np.roll(self.patterns[y], tuple(t * self.velocity[y]), axis=(0, 1)) for t in range(m.num_frames)]
        video = (np.stack(frames)[..., None] + 1) * self.tints[s] * brightness[:, None, None, None] - 1
        video = video + noise * rng.normal(size=(m.num_frames, m.frame_size, m.frame_size, 3))
        video_u8 = np.clip((video + 2) * 64, 0, 255).astype(np.uint8)  # (T, H, W, 3)
        audio = (self.chords[y] + self.syn.style_strength * self.overtones[s] + noise * rng.normal(size=m.audio_samples)).astype(np.float16)
        pools = (self.class_words[y], self.style_words[s], self.common_words)
        source = rng.choice(3, (m.text_candidates, m.text_len), p=self.syn.text_mix)  # class words, style words, common words
        ids = np.uint16 if m.vocab_size <= 1 << 16 else np.int32  # Base's 2**16 words overflow int16
        text = np.array([[rng.choice(pools[i]) for i in row] for row in source], dtype=ids)  # (candidates, words)
        return video_u8, audio, text


def samples(syn: SyntheticConfig, model: ModelConfig, *, count: int | None = None, split_seed: int = 0, misaligned: float | None = None) -> Iterator[dict]:
    """Triplets for the webdataset shard writer. ``split_seed`` draws another split from the same corpus."""
    corpus = Corpus(syn, model)
    rng = np.random.default_rng([syn.seed, split_seed, 1])
    swaps = np.random.default_rng([syn.seed, split_seed, 2])  # its own stream: the clips do not depend on the share
    count = syn.num_samples if count is None else count
    share = syn.misaligned if misaligned is None else misaligned
    labels = rng.integers(syn.num_classes, size=count)
    styles = rng.integers(syn.num_styles, size=count)
    group = labels * syn.num_styles + styles
    triplets = [corpus.triplet(int(y), int(s), rng) for y, s in zip(labels, styles)]
    text_swapped, audio_swapped = swaps.random(count) < share, swaps.random(count) < share
    for i in range(count):
        video, audio, text = triplets[i]
        others = np.flatnonzero(group != group[i])  # a partner of another (class, style) group
        if text_swapped[i]:
            text = triplets[int(swaps.choice(others))][2]
        if audio_swapped[i]:
            audio = triplets[int(swaps.choice(others))][1]
        meta = {"misaligned": int(text_swapped[i] or audio_swapped[i]), "text_swapped": int(text_swapped[i]), "audio_swapped": int(audio_swapped[i]), "style": int(styles[i])}
        yield {"__key__": f"t{split_seed:02d}{i:07d}", "video.npy": video, "audio.npy": audio, "text.npy": text, "cls": int(labels[i]), "json": meta}


class TripletDecoder:
    """Decode, then check a triplet against the model's sizes; a bad one raises, which the data path
    turns into a counted, named skip (labtrain.data.stages.decode)."""

    def __init__(self, model: ModelConfig):
        from labtrain.data import webdataset_decoder

        self.decode = webdataset_decoder()
        self.shapes = {
            "video.npy": (model.num_frames, model.frame_size, model.frame_size, 3),
            "audio.npy": (model.audio_samples,),
            "text.npy": (model.text_candidates, model.text_len),
        }
        self.vocab_size = model.vocab_size

    def __call__(self, sample: dict) -> dict:
        missing = [k for k in REQUIRED if k not in sample]
        if missing:
            raise ValueError(f"triplet {sample.get('__key__')} has no {', '.join(missing)}")
        out = self.decode(sample)
        for key, shape in self.shapes.items():
            if out[key].shape != shape:
                raise ValueError(f"triplet {sample['__key__']}: {key} has shape {out[key].shape}, expected {shape}")
        text = out["text.npy"]
        if not (text > 0).any(axis=1).all():
            raise ValueError(f"triplet {sample['__key__']}: empty text")
        if text.max() >= self.vocab_size or text.min() < 0:
            raise ValueError(f"triplet {sample['__key__']}: word id outside 0..{self.vocab_size - 1}")
        return out


def to_tensors(sample: dict) -> dict:
    """video (3, T, H, W) uint8 (the model scales it to [-1, 1] on the device: a quarter of the bytes in the shuffle,
    the batch and the host-to-device copy), audio (L,) float, texts (K, N) long, class, style, the swap flags."""
    video = torch.from_numpy(sample["video.npy"]).permute(3, 0, 1, 2)
    return {
        "video": video,
        "audio": torch.from_numpy(sample["audio.npy"].astype(np.float32)),
        "text": torch.from_numpy(sample["text.npy"].astype(np.int64)),
        "label": int(sample["cls"]),
        "misaligned": int(sample["json"]["misaligned"]),
        "text_swapped": int(sample["json"]["text_swapped"]),
        "audio_swapped": int(sample["json"]["audio_swapped"]),
        "style": int(sample["json"]["style"]),
        "__key__": sample["__key__"],
    }
