"""Video: frames in, segmented frames out, with the CPU and graph stages overlapped.

Stages run in threads joined by bounded queues (so memory stays flat however long the video):
prepare (resize, windows) -> encoder graph -> SFR on CPU -> head graph -> merge/output (the
caller's thread). ONNX Runtime, scipy and numpy release the GIL, so while the SFR step of one
batch runs, the encoder already works on the next; the graphs take the windows of up to
``frames_per_batch`` frames in one run, and a batch stays one batch from the encoder to the
head, so on a GPU its tokens and RCS map never come to the host (frames with more windows
than one run takes, Segmenter.max_windows, go in several batches). Without smoothing each
frame's result is the frame segmented as an image. On a 2-core CPU the stages compete for the
same cores, so the overlap gains little there (BENCHMARKS.md); it pays where the graphs run on
a GPU.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import cv2
import numpy as np

from resclip_deploy.errors import UserError
from resclip_deploy.pipeline import Prepared
from resclip_deploy.postprocess import Segmentation

from .segmenter import Segmenter, pack_runs

# FFmpeg prints its own lines for broken files; we report them in one line of ours. Read when
# OpenCV first opens a video, so set at import (a user's own setting wins).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".gif")
_END = object()
THREAD_PREFIX = "resclip-video-"
# A stream that fails this many reads in a row has ended (or is truncated).
MAX_CONSECUTIVE_FAILURES = 25


def is_video_source(source: str) -> bool:
    """A camera index ('0'), a stream URL ('rtsp://...') or a file with a video extension."""
    return source.isdigit() or "://" in source or source.lower().endswith(VIDEO_EXTENSIONS)


@dataclass
class VideoInfo:
    fps: float
    size: tuple[int, int]            # (H, W)
    frames: Optional[int]            # None for cameras and streams


def open_video(source: str) -> tuple[cv2.VideoCapture, VideoInfo, np.ndarray]:
    """Open a file, camera index or URL; a clear error when it cannot be read. Returns the first
    frame (BGR) too: it was read to check the source, and a live source cannot rewind."""
    is_file = not (source.isdigit() or "://" in source)
    if is_file and not os.path.isfile(source):
        raise UserError(f"video {source} does not exist")
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    ok, frame = cap.read() if cap.isOpened() else (False, None)
    if not ok or frame is None:
        cap.release()
        raise UserError(f"video {source} cannot be read (not a video OpenCV/FFmpeg decodes, an "
                        "empty file, or an unreachable camera/stream)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if is_file else 0
    info = VideoInfo(fps if fps and fps > 0 else 25.0, frame.shape[:2], count or None)
    return cap, info, frame


@dataclass
class ReadStats:
    read: int = 0
    skipped_corrupt: int = 0


def seek(cap: cv2.VideoCapture, source: str, start: int) -> np.ndarray:
    """Move a file's capture to frame ``start`` and read it (OpenCV's FFmpeg reader decodes
    from the key frame before it, so the frame is exact); -> that frame (BGR)."""
    if not cap.set(cv2.CAP_PROP_POS_FRAMES, start) or \
            int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != start:
        raise UserError(f"video {source} cannot be read from frame {start} (no seeking in it)")
    ok, frame = cap.read()
    if not ok or frame is None:
        raise UserError(f"video {source} has no frame {start}")
    return frame


def read_frames(cap: cv2.VideoCapture, info: VideoInfo, first: np.ndarray, stride: int,
                max_frames: Optional[int], stats: ReadStats, start: int = 0,
                stop: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, RGB uint8) every ``stride`` frames, at most ``max_frames``; ``first`` is
    frame ``start``, already read (by :func:`open_video`, or :func:`seek`); frames from
    ``stop`` on are not read.

    A frame that fails to decode before the known end is counted and skipped; many failures in a
    row end the stream.
    """
    index, failures, yielded = start - 1, 0, 0
    pending: Optional[np.ndarray] = first
    while (max_frames is None or yielded < max_frames) and (stop is None or index + 1 < stop):
        if pending is not None:
            ok, frame, pending = True, pending, None
        else:
            ok, frame = cap.read()
        index += 1
        if not ok or frame is None:
            if info.frames is not None and index >= info.frames:
                return
            failures += 1
            stats.skipped_corrupt += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                stats.skipped_corrupt -= failures     # the end, not corrupt frames
                return
            continue
        failures = 0
        if index % stride:
            continue
        stats.read += 1
        yielded += 1
        yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


@dataclass
class _Item:
    index: int
    rgb: np.ndarray
    prepared: Prepared


@dataclass
class _Batch:
    """Frames that go through the graphs together: their windows in one run per graph. The
    encoder's outputs for the head stay where the graph left them (on a GPU: the device)."""

    items: list[_Item]
    windows: np.ndarray
    enc: Optional[dict[str, Any]] = None
    step: Any = None
    logits: Any = None


class VideoEngine:
    """Segment a stream of frames with the stages overlapped; yields results in frame order.

    The stages are the segmenter's own (``encode``, ``refine``, ``head``), run on batches of up
    to ``frames_per_batch`` frames from the encoder to the head, so a batch's tokens and RCS map
    never leave the GPU between its two graph runs.
    """

    def __init__(self, segmenter: Segmenter, frames_per_batch: Optional[int] = None,
                 queue_size: int = 2, smoothing: Optional[float] = None,
                 sfr_workers: Optional[int] = None):
        # Several frames per graph run pay off on a GPU; on a CPU the graphs already use every
        # core and bigger batches only hold more memory (measured: 0.91x vs 0.94x, +700 MB).
        if frames_per_batch is None:
            frames_per_batch = 1 if segmenter.device_type == "cpu" else 4
        if frames_per_batch < 1 or queue_size < 1:
            raise UserError("frames per batch and queue size must be at least 1")
        if smoothing is not None and not 0.0 <= smoothing < 1.0:
            raise UserError(f"--smooth {smoothing}: give a weight in [0, 1) for the past frames")
        self.seg, self.batch, self.qsize, self.smoothing = (segmenter, frames_per_batch,
                                                             queue_size, smoothing)
        self.sfr_workers = sfr_workers

    def run(self, frames: Iterable[tuple[int, np.ndarray]],
            ) -> Iterator[tuple[int, np.ndarray, Segmentation]]:
        seg = self.seg
        stop = threading.Event()
        queues = [queue.Queue(self.qsize) for _ in range(4)]

        def produce() -> None:
            for index, rgb in frames:
                if stop.is_set():
                    break
                queues[0].put(_Item(index, rgb, seg.prepare(rgb)))
            queues[0].put(_END)

        def encoder(items: list[_Item]) -> Iterator[_Batch]:
            # frames whose windows exceed one run's go on in several batches, whole frames each
            for run in pack_runs([len(i.prepared.windows) for i in items], seg.max_windows):
                batch = _Batch([items[j] for j in run],
                               np.concatenate([items[j].prepared.windows for j in run]))
                batch.enc = seg.encode(batch.windows)
                yield batch

        def sfr(batches: list[_Batch]) -> list[_Batch]:
            for batch in batches:
                batch.step = seg.refine(batch.enc, self.sfr_workers)
            return batches

        def head(batches: list[_Batch]) -> list[_Batch]:
            for batch in batches:
                batch.logits = seg.head(batch.enc, batch.step)
                batch.enc = batch.step = None
            return batches

        threads = [threading.Thread(target=self._guard, args=(produce, stop, queues[0]),
                                    daemon=True, name=f"{THREAD_PREFIX}read"),
                   self._stage(queues[0], queues[1], encoder, self.batch, stop),
                   self._stage(queues[1], queues[2], sfr, 1, stop),
                   self._stage(queues[2], queues[3], head, 1, stop)]
        for t in threads:
            t.start()
        smoothed: Optional[np.ndarray] = None
        try:
            while True:
                batch = queues[3].get()
                if batch is _END:
                    break
                if isinstance(batch, BaseException):
                    raise batch
                results = seg.finish([i.prepared for i in batch.items], batch.logits,
                                     self.smoothing is not None)
                for item, result in zip(batch.items, results):
                    if self.smoothing is not None:
                        smoothed = result.probs if smoothed is None else \
                            self.smoothing * smoothed + (1 - self.smoothing) * result.probs
                        result = Segmentation(smoothed.argmax(axis=0).astype(np.int32),
                                              smoothed, result.class_names)
                    yield item.index, item.rgb, result
        finally:
            _shut_down(threads, queues, stop)

    def _stage(self, source: queue.Queue, sink: queue.Queue, work, gather: int,
               stop: threading.Event) -> threading.Thread:
        """A thread that takes up to ``gather`` ready objects from ``source``, passes them to
        ``work`` and puts what it returns into ``sink``; errors and the end marker travel on."""
        def loop() -> None:
            while not stop.is_set():
                first = source.get()
                if first is _END or isinstance(first, BaseException):
                    sink.put(first)
                    return
                got, ended = [first], None
                while len(got) < gather:
                    try:
                        nxt = source.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _END or isinstance(nxt, BaseException):
                        ended = nxt
                        break
                    got.append(nxt)
                for out in work(got):
                    sink.put(out)
                if ended is not None:
                    sink.put(ended)
                    return
        return threading.Thread(target=self._guard, args=(loop, stop, sink), daemon=True,
                                name=f"{THREAD_PREFIX}{work.__name__}")

    @staticmethod
    def _guard(fn, stop: threading.Event, sink: queue.Queue) -> None:
        """Run a stage; an error travels down the queues to the caller instead of hanging it."""
        try:
            fn()
        except BaseException as e:  # noqa: B036 — re-raised in the caller's thread
            stop.set()
            sink.put(e)


def _shut_down(threads: list[threading.Thread], queues: list[queue.Queue],
               stop: threading.Event, timeout: float = 30.0) -> None:
    """Stop the stages and wait for them, so that no thread still reads the capture or runs a
    graph when the caller releases them (Ctrl-C, an error, or an early stop). Stages finish the
    frame in hand: queues are drained (a full one blocks its producer) and fed an end marker (an
    empty one blocks its consumer) until every thread has returned."""
    stop.set()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        for q in queues:
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            with contextlib.suppress(queue.Full):
                q.put_nowait(_END)
        for t in threads:
            t.join(timeout=0.01)


def engine_stats(info: VideoInfo, stats: ReadStats, written: int, seconds: float,
                 interrupted: bool) -> dict[str, Any]:
    return {"fps_in": info.fps, "size": list(info.size), "frames_in_file": info.frames,
            "frames_read": stats.read, "frames_written": written,
            "frames_skipped_corrupt": stats.skipped_corrupt, "seconds": round(seconds, 3),
            "fps": round(written / seconds, 3) if seconds > 0 else None,
            "interrupted": interrupted}


@dataclass
class VideoOptions:
    stride: int = 1
    max_frames: Optional[int] = None
    save_frames: bool = False          # <stem>_frames/<index>.png label maps
    save_labels: bool = False          # <stem>_labels.npz, one array per frame, streamed
    smoothing: Optional[float] = None
    frames_per_batch: Optional[int] = None
    # frames start..stop-1 of a file only (resclip-batch splits videos into such ranges)
    start: int = 0
    stop: Optional[int] = None


def video_stem(source: str) -> str:
    if source.isdigit():
        return f"camera{source}"
    name = source.rstrip("/").split("/")[-1] or "stream"
    return os.path.splitext(name)[0] if "://" not in source else \
        "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def segment_video(source: str, segmenter: Segmenter, outdir: str, options: VideoOptions,
                  progress=None) -> dict[str, Any]:
    """Segment a video file, camera or stream into OUTDIR; returns its summary entry.

    Writes <stem>_overlay.mp4 (same frame rate and size; no audio), and on request per-frame
    label PNGs and a streamed .npz of label maps. Every file is written under a temporary name
    and renamed when finished, also after Ctrl-C (the frames done so far play).
    """
    import zipfile

    from resclip_deploy.io import label_dtype, label_png_bytes
    from resclip_deploy.overlay import colourise, palette

    if options.stride < 1 or (options.max_frames is not None and options.max_frames < 1):
        raise UserError("--frame-stride and --max-frames must be at least 1")
    cap, info, first = open_video(source)
    if options.start:
        try:
            first = seek(cap, source, options.start)
        except UserError:
            cap.release()
            raise
    stem = video_stem(source)
    os.makedirs(outdir, exist_ok=True)
    final = {"video": os.path.join(outdir, f"{stem}_overlay.mp4")}
    tmp = {"video": os.path.join(outdir, f".{stem}_overlay.tmp.mp4")}
    fps = info.fps / options.stride
    writer = cv2.VideoWriter(tmp["video"], cv2.VideoWriter_fourcc(*"mp4v"), fps,
                             (info.size[1], info.size[0]))
    if not writer.isOpened():
        raise UserError(f"cannot write {final['video']} (OpenCV has no mp4v encoder here)")
    frames_dir = os.path.join(outdir, f"{stem}_frames")
    if options.save_frames:
        os.makedirs(frames_dir, exist_ok=True)
    archive = None
    if options.save_labels:
        final["labels"] = os.path.join(outdir, f"{stem}_labels.npz")
        tmp["labels"] = os.path.join(outdir, f".{stem}_labels.tmp.npz")
        archive = zipfile.ZipFile(tmp["labels"], "w", zipfile.ZIP_DEFLATED)
    colours = palette(len(segmenter.vocab.class_names))
    stats, written, interrupted = ReadStats(), 0, False
    engine = VideoEngine(segmenter, options.frames_per_batch, smoothing=options.smoothing)
    start = time.perf_counter()
    try:
        for index, rgb, result in engine.run(read_frames(cap, info, first, options.stride,
                                                         options.max_frames, stats,
                                                         options.start, options.stop)):
            if rgb.shape[:2] != info.size:
                raise UserError(f"video {source}: frame {index} is {rgb.shape[1]}x"
                                f"{rgb.shape[0]}, not {info.size[1]}x{info.size[0]}")
            writer.write(cv2.cvtColor(colourise(rgb, result.labels, colours, 0.5),
                                      cv2.COLOR_RGB2BGR))
            if options.save_frames:
                with open(os.path.join(frames_dir, f"{index:06d}.png"), "wb") as f:
                    f.write(label_png_bytes(result.labels, len(colours)))
            if archive is not None:
                small = result.labels.astype(label_dtype(len(colours)))
                with archive.open(f"frame_{index:06d}.npy", "w") as f:
                    np.lib.format.write_array(f, small)
            written += 1
            if progress is not None:
                progress(written, time.perf_counter() - start)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        cap.release()
        writer.release()
        if archive is not None:
            archive.close()
        for key in tmp:
            os.replace(tmp[key], final[key])
    summary = {"input": source, "outputs": list(final.values()) +
               ([frames_dir] if options.save_frames else []),
               **engine_stats(info, stats, written, time.perf_counter() - start, interrupted)}
    return summary
