"""``resclip-batch``: a large set of images through a pool of segmenter actors on Ray Data (the
``[ray]`` extra), written as ``resclip-segment`` writes them.

    resclip-batch photos/ "more/*.jpg" s3://bucket/frames/ --bundle models/ade20k -o out

Inputs: files, folders (their images, not recursive) and glob patterns on this machine, and
folders or files under the URIs Ray Data reads (s3://, gs://, ...; listed through pyarrow's file
systems). Every image gives ``<stem>.png`` (and ``<stem>_overlay.jpg``, ``<stem>.npz`` with
--save-probs) in the output folder, written by the actor under a temporary name, then renamed;
an image whose outputs are all there is skipped, so an interrupted run resumes where it
stopped. A bad image is recorded in summary.json's ``failed`` and the rest go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

from .errors import UserError
from .io import IMAGE_EXTENSIONS, decode_image, expand_inputs, output_stems, write_json
from .segment import RUNTIME_ECHO, SUMMARY, SegmentOptions, segment_image

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
    videos = [p for p in paths if is_video_source(p)]
    if videos:
        raise UserError(f"{videos[0]} is a video; resclip-batch segments images (videos: "
                        "resclip-segment)")
    return list(dict.fromkeys(paths))


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
    todo: list[tuple[str, str]]            # (path, stem) still to segment
    done: list[str]                        # paths whose outputs are all there
    missing: list[str]                     # local paths that do not exist


def plan(paths: list[str], outdir: str, options: SegmentOptions) -> Plan:
    stems = output_stems(paths)
    todo, done, missing = [], [], []
    for path, stem in zip(paths, stems):
        if not is_uri(path) and not os.path.isfile(path):
            missing.append(path)
        elif all(os.path.exists(p) for p in expected_outputs(outdir, stem, options)):
            done.append(path)
        else:
            todo.append((path, stem))
    return Plan(todo, done, missing)


def ray_key(path: str) -> str:
    """A path as Ray Data's ``path`` column reports it: absolute, URIs without their scheme."""
    return path.split("://", 1)[1] if is_uri(path) else os.path.abspath(path)


class SegmentActor:
    """One segmenter per actor, loaded once; each row of a batch is an image's bytes and path
    (``inputs``: Ray's path -> (the input as given, its output stem))."""

    def __init__(self, bundle_dir: str, device: str, outdir: str,
                 inputs: dict[str, tuple[str, str]], options: SegmentOptions):
        from .ray_serve import granted_threads
        from .runtime.segmenter import Segmenter
        self.segmenter = Segmenter.from_bundle(bundle_dir, device=device,
                                               threads=granted_threads())
        self.outdir, self.inputs, self.options = outdir, inputs, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json
        results = []
        for data, key in zip(batch["bytes"], batch["path"]):
            path, stem = self.inputs[str(key)]
            entry = segment_image(self.segmenter, path, stem, self.outdir, self.options,
                                  lambda p, d=data: decode_image(bytes(d), f"image {p}"))
            results.append(json.dumps(entry if isinstance(entry, dict) else
                                      {"input": path, "error": entry}))
        return {"result": np.array(results, dtype=object)}


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
    images = [e for e in previous_summary(outdir).get("images", [])
              if isinstance(e, dict) and e.get("input") in done]
    failed = [{"input": p, "error": f"image {p} does not exist"} for p in work.missing]
    if work.todo:
        started_here = address is None and not ray.is_initialized()
        ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            keys = {ray_key(p): (p, stem) for p, stem in work.todo}
            # reading is I/O: a tenth of a CPU per read task leaves the CPUs to the actors
            ds = ray.data.read_binary_files([p for p, _ in work.todo], include_paths=True,
                                            ray_remote_args={"num_cpus": 0.1})
            ds = ds.map_batches(SegmentActor, batch_size=1, concurrency=actors,
                                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                                fn_constructor_args=(os.path.abspath(bundle_dir), device,
                                                     os.path.abspath(outdir), keys, options))
            for n, row in enumerate(ds.iter_rows(), 1):
                entry = json.loads(row["result"])
                (failed if "error" in entry else images).append(entry)
                progress(n, len(work.todo), entry)
        finally:
            if started_here:
                ray.shutdown()
    summary = {"pipeline": "bundle", "bundle": os.path.abspath(bundle_dir),
               "settings": {k: getattr(manifest.params, k) for k in RUNTIME_ECHO},
               "engine": {"ray_data": True, "actors": actors, "cpus_per_actor": cpus_per_actor,
                          "gpus_per_actor": gpus_per_actor},
               "skipped_as_done": len(work.done),
               "images": sorted(images, key=lambda e: e["input"]), "failed": failed}
    write_json(os.path.join(outdir, SUMMARY), summary)
    return summary


def _batch_command() -> Any:
    import click

    from .cli import EXIT_SOME_FAILED, _setup_logging, user_errors

    @click.command("resclip-batch", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("inputs", nargs=-1, required=True)
    @click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
                  help="The bundle resclip-export wrote (at the same path on every node).")
    @click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
                  help="Output folder (shared by every node): as resclip-segment writes it.")
    @click.option("--device", default="auto", show_default=True,
                  help="auto|cpu|cuda|tensorrt|openvino|openvino-bf16, on each actor.")
    @click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Segmenter actors (each loads the bundle once).")
    @click.option("--cpus-per-actor", type=click.FloatRange(min=0.1), default=None,
                  help="CPUs each actor asks Ray for (ONNX Runtime threads follow); default: "
                       "this machine's CPUs / actors.")
    @click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0.0,
                  show_default=True)
    @click.option("--overlay/--no-overlay", default=True, show_default=True)
    @click.option("--save-probs", is_flag=True, help="Also write <stem>.npz (labels, probs).")
    @click.option("--ray-address", default=None,
                  help="An existing cluster (e.g. auto); default: start Ray on this machine.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @user_errors
    def batch_main(inputs: tuple[str, ...], bundle_dir: str, outdir: str, device: str,
                   actors: int, cpus_per_actor: Optional[float], gpus_per_actor: float,
                   overlay: bool, save_probs: bool, ray_address: Optional[str],
                   quiet: bool) -> None:
        """Segment many images on Ray Data into OUTDIR; finished images are skipped, a bad one
        is recorded in summary.json's 'failed' and the rest go on (exit 1 if any failed)."""
        import sys
        _setup_logging(quiet)
        try:
            import ray.data  # noqa: F401
        except ImportError as e:
            raise UserError(f"resclip-batch needs the [ray] extra ({e.name} is missing): "
                            "pip install 'resclip-deploy[ray]'") from None
        if cpus_per_actor is None:
            cpus_per_actor = float(max(1, (os.cpu_count() or 1) // actors))

        def progress(n: int, total: int, entry: dict[str, Any]) -> None:
            if "error" in entry:
                click.echo(f"error: {entry['error']}", err=True)
            elif not quiet:
                click.echo(f"[{n}/{total}] {entry['input']} ({entry['seconds']:.2f} s)",
                           err=True)

        summary = run_batch(bundle_dir, list(inputs), outdir,
                            SegmentOptions(save_probs=save_probs, overlay=overlay), device,
                            actors, cpus_per_actor, gpus_per_actor, ray_address, progress)
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
