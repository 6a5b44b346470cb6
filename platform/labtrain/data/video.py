"""Encoded video in shards: H.264 ``.mp4`` bytes in, the frames a sampler asks for out (PyAV, in-process).

Labs keep clips encoded (Kinetics and HowTo100M shards hold ``.mp4``); a decoded float clip is ~100x the
bytes. :func:`decode_frames` seeks to the keyframe before the first frame it needs and decodes up to the
last one, so a 16-frame window of a 10-second clip costs a GOP or two of decoding, not the clip.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np


class VideoError(ValueError):
    """The bytes are not a decodable video (or lack the frames asked for); the data path skips the sample."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def encode_mp4(frames_THWC: np.ndarray, *, fps: int = 16, gop: int = 8, crf: int = 18) -> bytes:
    """H.264 in an MP4 container, yuv420p (sides must be even), one keyframe every ``gop`` frames, no
    B-frames (so presentation order is decode order and a seek lands where asked)."""
    frames_THWC = np.ascontiguousarray(frames_THWC, dtype=np.uint8)
    _, height, width, channels = frames_THWC.shape
    if channels != 3 or height % 2 or width % 2:
        raise ValueError(f"frames must be (T, H, W, 3) with even H and W, got {frames_THWC.shape}")
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "crf": str(crf), "preset": "veryfast", "bf": "0", "threads": "1"}
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _open(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as error:
        raise VideoError(f"not a readable video: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoError("the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO" if stream.codec_context.width * stream.codec_context.height >= 128 * 128 else "SLICE"
    return container, stream


def probe(data: bytes) -> VideoInfo:
    """Frame count, rate and size from the container header (counted by decoding when the header has none)."""
    import av

    container, stream = _open(data)
    with container:
        rate = float(stream.average_rate or stream.base_rate or 0)
        count = stream.frames
        if not count:
            try:
                count = sum(1 for _ in container.decode(stream))
            except av.FFmpegError as error:
                raise VideoError(f"cannot decode the video: {error}") from error
        return VideoInfo(int(count), rate, stream.codec_context.width, stream.codec_context.height)


def decode_frames(data: bytes, indices: Sequence[int], *, full: bool = False) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as uint8 (len(indices), H, W, 3).

    Decodes only from the keyframe before ``min(indices)`` to ``max(indices)``; ``full=True`` decodes
    from the first frame instead (what a loader without seeking does; the benchmark compares the two).
    Raises VideoError if the stream is corrupt or ends before ``max(indices)``."""
    import av

    wanted = set(int(i) for i in indices)
    if not wanted or min(wanted) < 0:
        raise ValueError(f"frame indices must be non-negative, got {list(indices)[:8]}")
    first, last = min(wanted), max(wanted)
    container, stream = _open(data)
    got: dict[int, np.ndarray] = {}
    with container:
        time_base, rate = stream.time_base, stream.average_rate or stream.base_rate
        if not time_base or not rate:
            raise VideoError("the video stream has no time base or frame rate")
        start_pts = stream.start_time or 0
        frame_period = 1 / (Fraction(rate) * time_base)  # pts units per frame
        try:
            if first > 0 and not full:
                container.seek(start_pts + int(first * frame_period), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise VideoError("a frame has no timestamp")
                index = round((frame.pts - start_pts) / frame_period)
                if index in wanted and index not in got:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        except av.FFmpegError as error:
            raise VideoError(f"cannot decode the video: {error}") from error
    missing = sorted(wanted - got.keys())
    if missing:
        raise VideoError(f"the video ended before frame {missing[0]} (decoded {len(got)} of the {len(wanted)} frames needed)")
    return np.stack([got[int(i)] for i in indices])
