"""``resclip-batch``: a large set of images and videos through a pool of segmenter actors on
Ray Data (the ``[ray]`` extra), written as ``resclip-segment`` writes them.

    resclip-batch photos/ "more/*.jpg" s3://bucket/frames/ clips/*.mp4 --bundle models/ade20k -o out

Inputs: files, folders (their images, not recursive) and glob patterns on this machine, and
folders or files under the URIs Ray Data reads (s3://, gs://, ...; listed through pyarrow's file
systems). Every image gives ``<stem>.png`` (and ``<stem>_overlay.jpg``, ``<stem>.npz`` with
--save-probs) in the output folder, written by the actor under a temporary name, then renamed;
an image whose outputs are all there is skipped, so an interrupted run resumes where it
stopped. A bad image is recorded in summary.json's ``failed`` and the rest go on.

Video files are split into ranges of ``--frames-per-task`` frames that actors segment in
parallel, each into ``<stem>_parts/<first>-<end>/`` (marked done when complete); once every
range of a video is done, the driver joins them into ``<stem>_overlay.mp4`` (and
``<stem>_frames/`` with --save-frames), as resclip-segment writes a video, and removes the
parts. Ranges already done are skipped on a rerun.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from .errors import UserError, cpus, needs_extra
from .io import IMAGE_EXTENSIONS, decode_image, expand_inputs, output_stems, write_json
from .segment import RUNTIME_ECHO, SUMMARY, SegmentOptions, segment_file

DONE = "done.json"             # a finished video range's marker, written last

def is_uri(item: str) -> bool:
    return "://" in item


def list_uri(uri: str) -> list[str]:
    """The images under a URI folder (not recursive), or the URI itself when it is a file."""
    import pyarrow.fs as pafs
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
            found = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and i.path.lower().endswith(IMAGE_EXTENSIONS))
        elif info.type == pafs.FileType.File:
            found = [path]
        else:
            raise UserError(f"{uri} does not exist")
    except (OSError, ValueError) as e:
        raise UserError(f"{uri} cannot be listed: {e}") from None
    if not found:
        raise UserError(f"{uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    scheme = uri.split("://", 1)[0]
    return [f"{scheme}://{p}" for p in found]


def list_inputs(inputs: Iterable[str]) -> list[str]:
    """Local files, folders and globs (as resclip-segment expands them) and URIs -> paths."""
    inputs = list(inputs)
    local = [i for i in inputs if not is_uri(i)]
    paths = expand_inputs(local) if local else []
    for uri in (i for i in inputs if is_uri(i)):
        paths.extend(list_uri(uri))
    from .runtime.video import is_video_source
    streams = [p for p in paths if is_video_source(p) and (p.isdigit() or is_uri(p))]
    if streams:
        raise UserError(f"{streams[0]} is a camera or a stream; resclip-batch splits video "
                        "files (cameras and streams: resclip-segment)")
    return list(dict.fromkeys(paths))


def is_video_file(path: str) -> bool:
    from .runtime.video import is_video_source
    return not is_uri(path) and is_video_source(path)


def video_ranges(path: str, frames_per_task: int) -> list[tuple[int, Optional[int]]]:
    """[first, end) frame ranges of a video file; one open range when its length is unknown."""
    import cv2
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise UserError(f"video {path} cannot be read (not a video OpenCV/FFmpeg decodes)")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    if count <= 0:
        return [(0, None)]
    return [(a, min(a + frames_per_task, count)) for a in range(0, count, frames_per_task)]


def range_dir(outdir: str, stem: str, first: int, end: Optional[int]) -> str:
    return os.path.join(outdir, f"{stem}_parts", f"{first:09d}-{'end' if end is None else end}")


def expected_outputs(outdir: str, stem: str, options: SegmentOptions) -> list[str]:
    """What a finished image left in ``outdir`` (each written atomically: there = complete)."""
    names = [f"{stem}.png"]
    if options.save_probs:
        names.append(f"{stem}.npz")
    if options.overlay:
        names.append(f"{stem}_overlay.jpg")
    return [os.path.join(outdir, n) for n in names]


@dataclass(frozen=True)
class Plan:
    todo: list[tuple[str, str]]            # (path, stem) images still to segment
    done: list[str]                        # images and videos whose outputs are all there
    missing: list[str]                     # local paths that do not exist
    videos: list[tuple[str, str]]          # (path, stem) video files not yet joined


def plan(paths: list[str], outdir: str, options: SegmentOptions) -> Plan:
    stems = output_stems(paths)
    todo, done, missing, videos = [], [], [], []
    for path, stem in zip(paths, stems):
        if not is_uri(path) and not os.path.isfile(path):
            missing.append(path)
        elif is_video_file(path):
            if os.path.exists(os.path.join(outdir, f"{stem}_overlay.mp4")):
                done.append(path)       # its ranges were joined by an earlier run
            else:
                videos.append((path, stem))
        elif all(os.path.exists(p) for p in expected_outputs(outdir, stem, options)):
            done.append(path)
        else:
            todo.append((path, stem))
    return Plan(todo, done, missing, videos)


def ray_key(path: str) -> str:
    """A path as Ray Data's ``path`` column reports it: absolute, URIs without their scheme."""
    return path.split("://", 1)[1] if is_uri(path) else os.path.abspath(path)


class _Actor:
    """One segmenter per actor, loaded once, with the threads Ray granted it."""

    def __init__(self, bundle_dir: str, device: str, outdir: str, options: SegmentOptions):
        from .ray_serve import granted_threads
        from .runtime.segmenter import Segmenter
        self.segmenter = Segmenter.from_bundle(bundle_dir, device=device,
                                               threads=granted_threads())
        self.outdir, self.options = outdir, options


class SegmentActor(_Actor):
    """Each row of a batch is an image's bytes and path (``inputs``: Ray's path -> (the input
    as given, its output stem))."""

    def __init__(self, bundle_dir: str, device: str, outdir: str,
                 inputs: dict[str, tuple[str, str]], options: SegmentOptions):
        super().__init__(bundle_dir, device, outdir, options)
        self.inputs = inputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json
        results = []
        for data, key in zip(batch["bytes"], batch["path"]):
            path, stem = self.inputs[str(key)]
            entry = segment_file(self.segmenter, path, stem, self.outdir, self.options,
                                  lambda p, d=data: decode_image(bytes(d), f"image {p}"))
            results.append(json.dumps(entry if isinstance(entry, dict) else
                                      {"input": path, "error": entry}))
        return {"result": np.array(results, dtype=object)}


class RangeActor(_Actor):
    """Each row is one range of a video file: segment_video into its range folder, then the
    done marker."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json
        import time
        from dataclasses import replace

        from .runtime.video import VideoOptions, segment_video
        results = []
        for path, stem, first, end in zip(batch["path"], batch["stem"], batch["first"],
                                          batch["end"]):
            first, end = int(first), (None if end < 0 else int(end))
            folder = range_dir(self.outdir, str(stem), first, end)
            options = replace(self.options.video or VideoOptions(), start=first, stop=end)
            start = time.perf_counter()
            try:
                entry = segment_video(str(path), self.segmenter, folder, options)
            except UserError as e:
                results.append(json.dumps({"input": str(path), "range": [first, end],
                                           "error": str(e)}))
                continue
            entry = {"range": [first, end], "frames": entry["frames_written"],
                     "seconds": round(time.perf_counter() - start, 3)}
            if entry["frames"]:
                write_json(os.path.join(folder, DONE), entry)
            else:
                entry["error"] = f"video {path}: no frame in [{first}, {end})"
            results.append(json.dumps({"input": str(path), **entry}))
        return {"result": np.array(results, dtype=object)}


def join_ranges(path: str, stem: str, outdir: str, ranges: list[tuple[int, Optional[int]]],
                save_frames: bool) -> dict[str, Any]:
    """Every range of one video done -> ``<stem>_overlay.mp4`` (and ``<stem>_frames/``) in
    ``outdir``, as resclip-segment writes a video; the range folders removed."""
    import json
    import shutil

    import cv2
    folders = [range_dir(outdir, stem, a, b) for a, b in ranges]
    final = os.path.join(outdir, f"{stem}_overlay.mp4")
    tmp = os.path.join(outdir, f".{stem}_overlay.tmp.mp4")
    writer, frames, seconds = None, 0, 0.0
    try:
        for folder in folders:
            with open(os.path.join(folder, DONE), encoding="utf-8") as f:
                seconds += json.load(f)["seconds"]
            cap = cv2.VideoCapture(os.path.join(folder, f"{stem}_overlay.mp4"))
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                if writer is None:
                    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"),
                                             cap.get(cv2.CAP_PROP_FPS),
                                             (frame.shape[1], frame.shape[0]))
                writer.write(frame)
                frames += 1
            cap.release()
    finally:
        if writer is not None:
            writer.release()
    os.replace(tmp, final)
    outputs = [final]
    if save_frames:
        target = os.path.join(outdir, f"{stem}_frames")
        os.makedirs(target, exist_ok=True)
        for folder in folders:
            source = os.path.join(folder, f"{stem}_frames")
            for name in sorted(os.listdir(source)):
                os.replace(os.path.join(source, name), os.path.join(target, name))
        outputs.append(target)
    shutil.rmtree(os.path.join(outdir, f"{stem}_parts"))
    return {"input": path, "outputs": outputs, "frames_written": frames, "ranges": len(ranges),
            "seconds": round(seconds, 3)}


def previous_summary(outdir: str) -> dict[str, Any]:
    """The summary.json of an earlier run into ``outdir`` (ours: JSON), or empty."""
    import json
    path = os.path.join(outdir, SUMMARY)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_batch(bundle_dir: str, inputs: list[str], outdir: str, options: SegmentOptions,
              device: str = "auto", actors: int = 1, cpus_per_actor: float = 1.0,
              gpus_per_actor: float = 0.0, address: Optional[str] = None,
              frames_per_task: int = 250,
              progress: Callable[[int, int, dict[str, Any]], None] = lambda *_: None,
              ) -> dict[str, Any]:
    """Segment ``inputs`` into ``outdir`` on Ray Data; -> the summary written there."""
    import json

    import ray

    from .bundle import read_bundle
    manifest = read_bundle(bundle_dir).manifest        # a bad bundle fails before Ray starts
    paths = list_inputs(inputs)
    work = plan(paths, outdir, options)
    os.makedirs(outdir, exist_ok=True)
    done = set(work.done)
    entries = [e for e in previous_summary(outdir).get("images", [])
               if isinstance(e, dict) and e.get("input") in done]
    failed = [{"input": p, "error": f"{p} does not exist"} for p in work.missing]
    ranges, broken = {}, set()
    for path, _ in work.videos:
        try:
            ranges[path] = video_ranges(path, frames_per_task)
        except UserError as e:
            failed.append({"input": path, "error": str(e)})
            broken.add(path)
    stems = dict(work.videos)
    rows = [{"path": p, "stem": stems[p], "first": a, "end": -1 if b is None else b}
            for p, spans in ranges.items() for a, b in spans
            if not os.path.exists(os.path.join(range_dir(outdir, stems[p], a, b), DONE))]
    total, n = len(work.todo) + len(rows), 0
    if total:
        started_here = address is None and not ray.is_initialized()
        ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)    # our own progress lines
            pool = {"batch_size": 1, "compute": ray.data.ActorPoolStrategy(size=actors),
                    "num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor or None}
            args = (os.path.abspath(bundle_dir), device, os.path.abspath(outdir))
            datasets = []
            if work.todo:
                keys = {ray_key(p): (p, stem) for p, stem in work.todo}
                # reading is I/O: read tasks ask for no CPU (actors holding every CPU would
                # starve them, and the run would hang)
                ds = ray.data.read_binary_files([p for p, _ in work.todo], include_paths=True,
                                                num_cpus=0)
                datasets.append(ds.map_batches(SegmentActor, **pool,
                                               fn_constructor_args=(*args, keys, options)))
            if rows:
                datasets.append(ray.data.from_items(rows).map_batches(
                    RangeActor, **pool, fn_constructor_args=(*args, options)))
            for ds in datasets:
                for row in ds.iter_rows():
                    entry = json.loads(row["result"])
                    n += 1
                    if "error" in entry:
                        failed.append(entry)
                        broken.add(entry["input"])
                    elif "range" not in entry:
                        entries.append(entry)
                    progress(n, total, entry)
        finally:
            if started_here:
                ray.shutdown()
    save_frames = bool(options.video and options.video.save_frames)
    for path in ranges:
        if path not in broken:
            entries.append(join_ranges(path, stems[path], outdir, ranges[path], save_frames))
    summary = {"pipeline": "bundle", "bundle": os.path.abspath(bundle_dir),
               "settings": {k: getattr(manifest.params, k) for k in RUNTIME_ECHO},
               "engine": {"ray_data": True, "actors": actors, "cpus_per_actor": cpus_per_actor,
                          "gpus_per_actor": gpus_per_actor, "frames_per_task": frames_per_task},
               "skipped_as_done": len(work.done),
               "images": sorted(entries, key=lambda e: e["input"]), "failed": failed}
    write_json(os.path.join(outdir, SUMMARY), summary)
    return summary


def _batch_command() -> Any:
    import click

    from .cli import EXIT_SOME_FAILED, _setup_logging, device_option, user_errors

    @click.command("resclip-batch", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("inputs", nargs=-1, required=True)
    @click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
                  help="The bundle resclip-export wrote (at the same path on every node).")
    @click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
                  help="Output folder (shared by every node): as resclip-segment writes it.")
    @device_option(", on each actor.")
    @click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Segmenter actors (each loads the bundle once).")
    @click.option("--cpus-per-actor", type=click.FloatRange(min=0.1), default=None,
                  help="CPUs each actor asks Ray for (ONNX Runtime threads follow); default: "
                       "this machine's CPUs / actors.")
    @click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0,
                  show_default=True)
    @click.option("--overlay/--no-overlay", default=True, show_default=True)
    @click.option("--save-probs", is_flag=True, help="Also write <stem>.npz (labels, probs).")
    @click.option("--frames-per-task", type=click.IntRange(min=1), default=250,
                  show_default=True, help="Videos: frames per range an actor segments.")
    @click.option("--save-frames", is_flag=True,
                  help="Videos: also write <stem>_frames/<index>.png label maps.")
    @click.option("--ray-address", default=None,
                  help="An existing cluster (e.g. auto); default: start Ray on this machine.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @user_errors
    def batch_main(inputs: tuple[str, ...], bundle_dir: str, outdir: str, device: str,
                   actors: int, cpus_per_actor: Optional[float], gpus_per_actor: float,
                   overlay: bool, save_probs: bool, frames_per_task: int, save_frames: bool,
                   ray_address: Optional[str], quiet: bool) -> None:
        """Segment many images on Ray Data into OUTDIR; finished images are skipped, a bad one
        is recorded in summary.json's 'failed' and the rest go on (exit 1 if any failed)."""
        import sys
        _setup_logging(quiet)
        with needs_extra("resclip-batch", "ray"):
            import ray.data  # noqa: F401
        if cpus_per_actor is None:
            cpus_per_actor = float(cpus(actors))

        def progress(n: int, total: int, entry: dict[str, Any]) -> None:
            if "error" in entry:
                click.echo(f"error: {entry['error']}", err=True)
            elif not quiet:
                frames = (f" frames {entry['range'][0]}-{entry['range'][1]}"
                          if "range" in entry else "")
                click.echo(f"[{n}/{total}] {entry['input']}{frames} ({entry['seconds']:.2f} s)",
                           err=True)

        from .runtime.video import VideoOptions
        options = SegmentOptions(save_probs=save_probs, overlay=overlay,
                                 video=VideoOptions(save_frames=save_frames))
        summary = run_batch(bundle_dir, list(inputs), outdir, options, device, actors,
                            cpus_per_actor, gpus_per_actor, ray_address, frames_per_task,
                            progress)
        if not quiet:
            click.echo(f"{len(summary['images'])} image(s) in {outdir} "
                       f"({summary['skipped_as_done']} already done), "
                       f"{len(summary['failed'])} failed; summary: {SUMMARY}", err=True)
        if summary["failed"]:
            sys.exit(EXIT_SOME_FAILED)
    return batch_main


def batch_entry() -> None:
    from .cli import run_command
    run_command(_batch_command())


if __name__ == "__main__":
    batch_entry()
