"""``resclip-segment``'s work as a library call: images and videos in, outputs and summary.json out.

>>> from resclip_deploy.runtime.segmenter import Segmenter
>>> run = segment_inputs(Segmenter.from_bundle("models/ade20k"), ["photos/"], "out")
>>> run.failed, run.summary["images"][0]["classes"]

A bad input is recorded in ``failed`` and the others still run; Ctrl-C during a video finishes
its files and stops (``interrupted``). The command line only parses options, calls this and maps
the result to an exit code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import UserError
from .io import (expand_inputs, image_summary, output_stems, read_image, write_json,
                 write_overlay, write_segmentation)
from .params import RUNTIME_SETTINGS

SUMMARY = "summary.json"
# Settings echoed in the summary: the ones a run may change, and the ones that explain it.
RUNTIME_ECHO = RUNTIME_SETTINGS + ("method", "rcs", "sfr", "mode", "short_side")


@dataclass
class SegmentOptions:
    save_probs: bool = False       # <stem>.npz with labels and (C, H, W) probabilities
    overlay: bool = True           # <stem>_overlay.jpg
    # Videos: frame stride, frame limit, per-frame PNGs / npz, smoothing (runtime.video).
    video: Any = None


class Reporter:
    """What a run tells its caller as it goes; these do nothing (the CLI prints)."""

    def images_started(self, count: int) -> None:
        """``count`` images are about to run."""

    def image_done(self, path: str, entry: dict[str, Any]) -> None:
        """One image written; ``entry`` is its summary.json entry."""

    def frame_done(self, frames: int, seconds: float) -> None:
        """A video has written ``frames`` frames in ``seconds``."""

    def video_done(self, entry: dict[str, Any]) -> None:
        """A video (or a stream, up to its end or Ctrl-C) is written."""

    def failed(self, source: str, error: str) -> None:
        """One input could not be segmented; the run goes on."""


@dataclass
class SegmentRun:
    """The outcome: ``summary`` is what summary.json holds."""

    inputs: int                                  # images and videos asked for
    summary: dict[str, Any]
    failed: list[dict[str, str]] = field(default_factory=list)
    interrupted: bool = False


def split_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """-> (videos: files, cameras, URLs; image files from files, folders and globs)."""
    from .runtime.video import is_video_source
    videos = [i for i in inputs if is_video_source(i)]
    rest = [i for i in inputs if not is_video_source(i)]
    return videos, expand_inputs(rest) if rest else []


def check_pipeline(inputs: list[str], pipeline: str) -> None:
    """Videos need a bundle (the torch reference segments images only)."""
    from .runtime.video import is_video_source
    videos = [i for i in inputs if is_video_source(i)]
    if videos and pipeline != "bundle":
        raise UserError(f"video input {videos[0]} needs --bundle DIR (the torch reference "
                        "segments images only)")


def segment_inputs(segmenter: Any, inputs: list[str], outdir: str,
                   options: Optional[SegmentOptions] = None,
                   reporter: Optional[Reporter] = None, pipeline: str = "bundle",
                   bundle: Optional[str] = None) -> SegmentRun:
    """Segment images and videos into ``outdir`` and write summary.json there.

    ``segmenter``: a bundle :class:`~resclip_deploy.runtime.segmenter.Segmenter` or the torch
    reference (images only). ``pipeline`` / ``bundle`` are recorded in the summary.
    """
    options = options or SegmentOptions()
    reporter = reporter or Reporter()
    check_pipeline(inputs, pipeline)
    videos, files = split_inputs(inputs)
    stems = output_stems(files)
    run = SegmentRun(len(videos) + len(files), {})
    runs: list[dict[str, Any]] = []
    for source in videos:
        try:
            entry = _video(segmenter, source, outdir, options, reporter)
        except UserError as e:
            run.failed.append({"input": source, "error": str(e)})
            reporter.failed(source, str(e))
            continue
        runs.append(entry)
        reporter.video_done(entry)
        if entry["interrupted"]:
            run.interrupted = True
            break
    todo = [] if run.interrupted else list(zip(files, stems))
    reporter.images_started(len(todo))
    for path, stem in todo:
        entry = segment_file(segmenter, path, stem, outdir, options)
        if isinstance(entry, str):
            run.failed.append({"input": path, "error": entry})
            reporter.failed(path, entry)
            continue
        runs.append(entry)
        reporter.image_done(path, entry)
    run.summary = {"pipeline": pipeline, "bundle": os.path.abspath(bundle) if bundle else None,
                   "settings": {k: getattr(segmenter.params, k) for k in RUNTIME_ECHO},
                   "providers": getattr(segmenter, "providers", None),
                   "images": runs, "failed": run.failed}
    write_json(os.path.join(outdir, SUMMARY), run.summary)
    return run


def segment_file(segmenter: Any, path: str, stem: str, outdir: str,
                  options: SegmentOptions, read: Callable[[str], Any] = read_image,
                  ) -> dict[str, Any] | str:
    """One image's outputs -> its summary entry, or the error message. ``read(path)`` gives
    its RGB array (a file read here; bytes another reader fetched, for resclip-batch)."""
    start = time.perf_counter()
    try:
        rgb = read(path)
        seg = segmenter.segment(rgb, with_probs=options.save_probs)
    except UserError as e:
        return str(e)
    written = write_segmentation(outdir, stem, seg, options.save_probs)
    if options.overlay:
        written.append(write_overlay(outdir, stem, rgb, seg))
    return image_summary(path, written, seg, time.perf_counter() - start)


def _video(segmenter: Any, source: str, outdir: str, options: SegmentOptions,
           reporter: Reporter) -> dict[str, Any]:
    from .runtime.video import VideoOptions, segment_video
    return segment_video(source, segmenter, outdir, options.video or VideoOptions(),
                         reporter.frame_done)
