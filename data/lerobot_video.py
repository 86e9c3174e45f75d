"""Camera frames in LeRobot's mp4 files, through PyAV: decoded and matched to rows by timestamp, or encoded.

Several episodes share one mp4 (v3.0), one after another in time, so a reader that is asked for the
episodes in order decodes each file once from start to end; it seeks only when asked to go back or
to another file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dopr.data.lerobot_format import require
from dopr.data.validate import EpisodeStoreError

# lerobot's encoder settings (video_utils.encode_video_frames): a key frame every 2 frames keeps random
# access cheap for its training-time loader; crf 30; SVT-AV1's fastest preset.
ENCODERS = {
    "libsvtav1": {"crf": "30", "g": "2", "preset": "12"},
    "h264": {"crf": "30", "g": "2"},
    "hevc": {"crf": "30", "g": "2", "x265-params": "log-level=error"},
}
# lerobot's default tolerance between a row's timestamp and the frame it gets (LeRobotDataset.tolerance_s)
TOLERANCE_S = 1e-4


class VideoFrames:
    """Frames of one camera key, episode by episode: ``read(path, times)`` returns (N, H, W, 3) uint8,
    one frame for each of the sorted ``times`` (seconds from the file's start), or raises naming the
    file, the key and what did not match."""

    def __init__(self, key: str, tolerance_s: float = TOLERANCE_S):
        self.key = key
        self.tolerance_s = tolerance_s
        self._av = require("av")
        self._path: Path | None = None
        self._container = None
        self._frames = None  # the decoder's frame iterator
        self._pending = None  # a decoded frame past the last request: the next request's first candidate

    def _open(self, path: Path, start: float) -> None:
        av = self._av
        self.close()
        if not path.is_file():
            raise EpisodeStoreError(f"{path}: video file of '{self.key}' not found")
        try:
            self._container = av.open(str(path))
        except av.error.FFmpegError as err:
            raise EpisodeStoreError(f"{path}: video of '{self.key}' cannot be opened: {err}") from None
        if not self._container.streams.video:
            raise EpisodeStoreError(f"{path}: file of '{self.key}' holds no video stream")
        stream = self._container.streams.video[0]
        codec = stream.codec_context.name if stream.codec_context is not None else "unknown"
        if stream.codec_context is None or codec not in av.codecs_available:
            raise EpisodeStoreError(
                f"{path}: video of '{self.key}' is {codec}, which this PyAV build cannot decode; "
                "install a PyAV wheel with that decoder (AV1 needs libdav1d or libaom)")
        stream.thread_type = "AUTO"  # frame threads: several frames decode at once
        if start > self.tolerance_s:  # back to the key frame before `start`; frames before it are skipped
            self._container.seek(int(start / stream.time_base), stream=stream)
        self._path, self._pending = path, None
        self._frames = self._decode(stream)

    def _decode(self, stream):
        try:
            yield from self._container.decode(stream)
        except self._av.error.FFmpegError as err:
            raise EpisodeStoreError(f"{self._path}: decoding '{self.key}' failed: {err}") from None

    def read(self, path: Path, times: np.ndarray) -> np.ndarray:
        tol = self.tolerance_s
        if path != self._path or self._pending is None or self._pending.time > times[0] + tol:
            self._open(path, float(times[0]))
        out, filled = None, np.zeros(len(times), dtype=bool)
        frame, self._pending = self._pending, None
        while True:
            if frame is None:
                frame = next(self._frames, None)
                if frame is None:
                    break
            t = frame.time
            if t > times[-1] + tol:
                self._pending = frame
                break
            if t >= times[0] - tol:
                i = int(np.clip(np.searchsorted(times, t), 1, len(times) - 1)) if len(times) > 1 else 0
                i = i - 1 if i > 0 and abs(times[i - 1] - t) <= abs(times[i] - t) else i
                if abs(times[i] - t) > tol:
                    raise EpisodeStoreError(f"{path}: '{self.key}' has a frame at {t:.6f} s that matches no row "
                                            f"(nearest row time {times[i]:.6f} s, tolerance {tol} s)")
                image = frame.to_ndarray(format="rgb24")
                if out is None:
                    out = np.empty((len(times), *image.shape), dtype=np.uint8)
                out[i], filled[i] = image, True
            frame = None
        if not filled.all():
            missing = np.flatnonzero(~filled)
            raise EpisodeStoreError(
                f"{path}: '{self.key}' has {int(filled.sum())} frames between {times[0]:.6f} s and "
                f"{times[-1]:.6f} s, but the episode has {len(times)} rows; no frame for the row at "
                f"{times[missing[0]]:.6f} s")
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._frames, self._pending, self._path = None, None, None, None


class VideoWriter:
    """One mp4 of ``fps`` frames/s: ``write(frames)`` appends (N, H, W, 3) uint8 frames; ``duration`` is
    the end time of the frames written so far, where the next episode starts; ``bytes_written`` counts
    the encoded bytes so far, which lag the frames by the encoder's lookahead (H.264 ~3 frames with
    lerobot's settings, SVT-AV1 ~20)."""

    def __init__(self, path: Path, fps: int, codec: str = "libsvtav1"):
        av = require("av")
        if codec not in ENCODERS:
            raise ValueError(f"video codec {codec!r} is not one of {sorted(ENCODERS)}")
        if codec not in av.codecs_available:
            raise ValueError(f"this PyAV build has no {codec} encoder; choose one of "
                             f"{sorted(c for c in ENCODERS if c in av.codecs_available)}")
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration unless told errors only
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fps, self.codec, self.n_frames, self.bytes_written = path, fps, codec, 0, 0
        self._container = av.open(str(path), "w")
        self._stream = None
        self._av = av

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    def write(self, frames: np.ndarray) -> None:
        if self._stream is None:
            height, width = frames.shape[1:3]
            if height % 2 or width % 2:
                raise ValueError(f"{self.path}: frames of {height}x{width}: yuv420p video needs even sizes")
            self._stream = self._container.add_stream(self.codec, rate=self.fps, options=ENCODERS[self.codec])
            self._stream.pix_fmt = "yuv420p"
            self._stream.width, self._stream.height = width, height
        for image in frames:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.n_frames  # in the encoder's time base, 1/fps
            packets = self._stream.encode(frame)
            self._container.mux(packets)
            self.bytes_written += sum(p.size for p in packets)
            self.n_frames += 1

    def close(self) -> None:
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        self._container.close()


def video_info(path: Path) -> dict:
    """The ``info`` entry lerobot records for a video feature (video_utils.get_video_info)."""
    av = require("av")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {"video.height": stream.height, "video.width": stream.width,
                "video.codec": stream.codec_context.codec.canonical_name if stream.codec_context.codec else
                stream.codec_context.name, "video.pix_fmt": stream.pix_fmt, "video.is_depth_map": False,
                "video.fps": int(stream.base_rate), "video.channels": 3, "has_audio": False}
