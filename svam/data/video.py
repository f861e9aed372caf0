"""Video files through PyAV (FFmpeg): frames by timestamp out, frame sequences in.

Decoding seeks to the keyframe before the first requested time and decodes forward, so an
episode stored in the middle of a long file (LeRobot v3.0 concatenates episodes) costs its own
frames plus at most one group of pictures. Frames are resized with OpenCV's area filter, the
standard choice for downsampling, as they are decoded: memory holds the output size, never a
sequence of full-resolution frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

# SVT-AV1 prints its configuration to stderr for every encoder it opens; keep errors only.
os.environ.setdefault("SVT_LOG", "1")


class VideoError(ValueError):
    """A video file that is missing, unreadable or lacks a requested frame; names the file."""


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: area filter down, bilinear up."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def decode_frames(
    path: str | Path, timestamps: np.ndarray, size: int, tolerance_s: float
) -> np.ndarray:
    """RGB frames (N, size, size, 3) uint8 of the first video stream at `timestamps` (seconds,
    strictly increasing); a frame counts as the one at t when its presentation time is within
    `tolerance_s` of t. A missing file, a decode error or a frame the file lacks (truncated, or
    frames dropped) raises VideoError naming the file and the time."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file missing")
    out = np.empty((len(timestamps), size, size, 3), np.uint8)
    if not len(timestamps):
        return out
    found = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            first = float(timestamps[0])
            if first > tolerance_s:
                container.seek(
                    max(int((first - tolerance_s) / stream.time_base), 0),
                    stream=stream,
                    backward=True,
                    any_frame=False,
                )
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                time = float(frame.pts * stream.time_base)
                if time < timestamps[found] - tolerance_s:
                    continue
                if time > timestamps[found] + tolerance_s:
                    raise VideoError(
                        f"{path}: no frame at t={timestamps[found]:.4f}s (the next is at "
                        f"{time:.4f}s): frames dropped, or timestamps that do not match the video"
                    )
                out[found] = resize_rgb(frame.to_ndarray(format="rgb24"), size)
                found += 1
                if found == len(timestamps):
                    return out
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: unreadable video ({exc})") from exc
    raise VideoError(
        f"{path}: ends before t={timestamps[found]:.4f}s ({found} of {len(timestamps)} frames "
        "found): truncated, or shorter than its metadata says"
    )


class VideoWriter:
    """Append RGB frames to one video stream; `time` is where the next frame lands (seconds).

    Frames get consecutive presentation times 1/fps apart, so episodes written one after another
    into one file start where the previous ended (LeRobot v3.0's `from_timestamp`)."""

    def __init__(
        self,
        path: str | Path,
        fps: int,
        size: tuple[int, int],
        codec: str,
        pix_fmt: str,
        options: dict[str, str],
    ):
        import av

        self.path = Path(path)
        self._container = av.open(str(self.path), "w")
        self._stream = self._container.add_stream(codec, rate=Fraction(fps), options=options)
        self._stream.height, self._stream.width = size
        self._stream.pix_fmt = pix_fmt
        self.fps = fps
        self.frames = 0

    @property
    def time(self) -> float:
        return self.frames / self.fps

    def write(self, frames: Iterable[np.ndarray]) -> None:
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            frame.time_base = Fraction(1, self.fps)
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frames_of(path: str | Path) -> Iterator[np.ndarray]:
    """Every frame of the first video stream as RGB (H, W, 3) uint8, in order."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")
