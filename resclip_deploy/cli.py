"""Command-line entry points. Bad input: one line on stderr naming it, and a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from typing import Any, Callable, Optional

import click

from .bundle import PRECISIONS
from .datasets import LAYOUTS as DATASETS
from .errors import UserError, needs_extra
from .params import (CONNECTIVITIES, CUSTOM, METHODS, MODES, PRESETS, RUNTIME_SETTINGS,
                     ResCLIPParams, flag, preset_params)
from .runtime.devices import DEVICES
from .stages import parse_stages
from .vocab import Vocabulary, preset_vocabulary, resolve_vocabulary

log = logging.getLogger("resclip_deploy")

EXIT_BAD_INPUT = 2      # nothing was done: settings, vocabulary or model unusable
EXIT_SOME_FAILED = 1    # some inputs failed; the others were written


def resolve_settings(preset: Optional[str], classes: Optional[str],
                     overrides: dict[str, Any]) -> tuple[ResCLIPParams, Vocabulary]:
    """Preset and/or class list + explicit overrides -> (params, vocabulary).

    A preset gives its settings and its classes; --classes replaces the classes only. Without a
    preset, the custom-vocabulary defaults apply. Only options the user gave override.
    """
    if preset is None and classes is None:
        raise UserError(f"give a vocabulary: --preset NAME ({', '.join(PRESETS)}) or "
                        "--classes FILE_OR_LIST")
    base = preset_params(preset) if preset is not None else CUSTOM
    vocab = resolve_vocabulary(classes) if classes is not None else preset_vocabulary(preset)
    return base.replace(**overrides), vocab


# How the CLI takes each runtime setting over a bundle's (params.RUNTIME_SETTINGS).
RUNTIME_OPTIONS = {
    "connectivity": (click.Choice(CONNECTIVITIES),
                     "Override the bundle's SFR same-entity test for this run."),
    "prob_thd": (float, "Override the bundle's prob_thd."),
    "temp_thd": (float, "Override the bundle's temp_thd."),
}


def runtime_options(f: Callable) -> Callable:
    """--connectivity, --prob-thd, --temp-thd: a bundle's runtime settings for this run."""
    for setting in reversed(RUNTIME_SETTINGS):
        kind, text = RUNTIME_OPTIONS[setting]
        f = click.option(flag(setting), type=kind, default=None, help=text)(f)
    return f


def device_option(after: str = ".") -> Callable:
    """--device for the bundle's graphs: the runtime's devices (runtime/devices.py), then
    ``after``."""
    return click.option("--device", default="auto", show_default=True,
                        help="|".join(DEVICES) + after)


def method_options(f: Callable) -> Callable:
    """Options shared by resclip-segment and resclip-export (model, vocabulary, method)."""
    options = [
        click.option("--model", "model_name", default=None,
                     help="open_clip model name (e.g. ViT-B-16-quickgelu), 'auto' (default) "
                          "to infer the architecture of an OpenAI-format checkpoint file, or an "
                          "open_clip model folder: hf-hub:ORG/REPO or local-dir:PATH."),
        click.option("--pretrained", default=None,
                     help="open_clip pretrained tag (e.g. openai) or a local checkpoint file "
                          "(not with hf-hub:/local-dir:, which carry their weights)."),
        click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                     help="Benchmark preset: its settings and class list."),
        click.option("--classes", default=None,
                     help="Class file (one class per line, synonyms ', '-separated) or a list "
                          "'sky,person|man,tree' (',' between classes, '|' between synonyms)."),
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="Base attention of the last block."),
        click.option("--rcs/--no-rcs", default=None, help="Residual cross-correlation "
                     "self-attention."),
        click.option("--sfr/--no-sfr", default=None, help="Semantic feedback refinement."),
        click.option("--connectivity", type=click.Choice(CONNECTIVITIES), default=None,
                     help="SFR same-entity test: 'reference' (authors' line walk, for parity) "
                          "or 'components' (8-connected, default)."),
        click.option("--mode", type=click.Choice(MODES), default=None,
                     help="Sliding 224 windows or one whole-image forward."),
        click.option("--short-side", type=int, default=None, help="Resize the short side to N."),
        click.option("--temp-thd", type=float, default=None,
                     help="SFR pre-pass confidence threshold."),
        click.option("--prob-thd", type=float, default=None,
                     help="Label 0 where the best class probability is below this."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def user_errors(f: Callable) -> Callable:
    """Turn UserError into one stderr line and exit code 2."""
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


def run_command(command: click.Command) -> None:
    """Console-script entry: click's usage errors also become one 'error:' line and exit 2."""
    try:
        rv = command.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()} (see {command.name} --help)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(rv if isinstance(rv, int) else 0)


def _setup_logging(quiet: bool) -> None:
    """Our messages on stderr. Libraries' log records (open_clip's own download errors, which we
    report in our words) are dropped: a root handler stops logging.error() from installing one."""
    logging.getLogger().addHandler(logging.NullHandler())
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


@click.command("resclip-segment", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: <stem>.png label maps (and <stem>.npz with --save-probs).")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None,
              help="Run an exported ONNX bundle (no torch needed).")
@click.option("--reference", is_flag=True,
              help="Run the torch reference pipeline instead (needs the [export] extra).")
@method_options
@click.option("--save-probs", is_flag=True,
              help="Also write <stem>.npz with labels (H,W) and probs (C,H,W) float32.")
@click.option("--device", default="auto", show_default=True,
              help="--bundle: auto|cpu|cuda|tensorrt (auto: TensorRT, CUDA, then CPU), or "
                   "openvino|openvino-bf16 (OpenVINO on the CPU; the [openvino] extra). "
                   "--reference: a torch device (auto: cuda if present, else cpu).")
@click.option("--overlay/--no-overlay", default=True, show_default=True,
              help="Also write <stem>_overlay.jpg: the photo, class colours and a legend.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--stages", "stages_text", default=None,
              help="--bundle: stage implementations over the device's choice, e.g. "
                   "prepass=graph or all=numpy (see docs/architecture.md: Stages on the device).")
@click.option("--frame-stride", type=int, default=1, show_default=True,
              help="Video: segment every Nth frame (the output video has fps/N).")
@click.option("--max-frames", type=int, default=None, help="Video: stop after N frames.")
@click.option("--save-frames", is_flag=True,
              help="Video: also write <stem>_frames/<frame>.png label maps.")
@click.option("--save-labels", is_flag=True,
              help="Video: also write <stem>_labels.npz, one label map per frame.")
@click.option("--smooth", type=float, default=None,
              help="Video: temporal smoothing of class probabilities, weight of the past in "
                   "[0, 1) (off by default; see docs/segment.md: Video).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@user_errors
def segment_main(inputs: tuple[str, ...], outdir: str, bundle_dir: Optional[str],
                 reference: bool, model_name: Optional[str], pretrained: Optional[str],
                 preset: Optional[str], classes: Optional[str], save_probs: bool, device: str,
                 overlay: bool, threads: Optional[int], stages_text: Optional[str],
                 frame_stride: int,
                 max_frames: Optional[int], save_frames: bool, save_labels: bool,
                 smooth: Optional[float], quiet: bool, **overrides: Any) -> None:
    """Segment images (files, folders, globs) into OUTDIR.

    Writes <stem>.png label maps, <stem>_overlay.jpg, <stem>.npz with --save-probs, and
    summary.json (per image: size, seconds, class pixel fractions; the settings used).
    Videos (files, camera indices, stream URLs; --bundle only) give <stem>_overlay.mp4 at the
    same frame rate and size, without audio.
    """
    _setup_logging(quiet)
    from .runtime.video import VideoOptions
    from .segment import SUMMARY, SegmentOptions, check_pipeline, segment_inputs

    check_pipeline(list(inputs), "bundle" if bundle_dir is not None else "reference")
    if reference == (bundle_dir is not None):
        raise UserError("choose one pipeline: --bundle DIR (ONNX, from resclip-export) or "
                        "--reference (torch)")
    if bundle_dir is not None:
        segmenter = _bundle_segmenter(bundle_dir, model_name, pretrained, preset, classes,
                                      device, threads, overrides, parse_stages(stages_text))
    else:
        if stages_text:
            raise UserError("--stages chooses how a bundle's stages run; the torch reference "
                            "(--reference) has one implementation")
        params, vocab = resolve_settings(preset, classes, overrides)
        segmenter = _reference_segmenter(model_name or "auto", pretrained, vocab, params, device)
    options = SegmentOptions(save_probs, overlay, VideoOptions(frame_stride, max_frames,
                                                               save_frames, save_labels, smooth))
    reporter = _ClickReporter(quiet)
    try:
        run = segment_inputs(segmenter, list(inputs), outdir, options, reporter,
                             "bundle" if bundle_dir else "reference", bundle_dir)
    finally:
        reporter.close()
    log.info("%d input(s) written to %s (summary: %s)", len(run.summary["images"]), outdir,
             SUMMARY)
    if run.interrupted:
        click.echo("error: interrupted; the output written so far is complete and plays",
                   err=True)
        sys.exit(130)
    if run.failed:
        if run.inputs > 1:
            click.echo(f"error: {len(run.failed)} of {run.inputs} inputs failed: "
                       f"{', '.join(f['input'] for f in run.failed)}", err=True)
        sys.exit(EXIT_SOME_FAILED)


class _ClickReporter:
    """A run's progress on stderr: a bar over several images, frames per second for videos,
    one line per failed input."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.images = quiet, None, 0

    def images_started(self, count: int) -> None:
        self.images = count
        if count > 1 and not self.quiet:
            self.bar = click.progressbar(length=count, label="segmenting", file=sys.stderr,
                                         show_pos=True)
            self.bar.render_progress()

    def image_done(self, path: str, entry: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.images == 1:
            h, w = entry["size"]
            log.info("%s -> %s (%dx%d, %.2f s)", path, ", ".join(entry["outputs"]), w, h,
                     entry["seconds"])

    def frame_done(self, frames: int, seconds: float) -> None:
        if not self.quiet:
            click.echo(f"\rframes: {frames}  ({frames / max(seconds, 1e-9):.2f} fps)", err=True,
                       nl=False)

    def video_done(self, entry: dict[str, Any]) -> None:
        if not self.quiet:
            click.echo("", err=True)
        log.info("%s -> %s (%d frames, %d skipped as corrupt, %.2f fps)", entry["input"],
                 ", ".join(entry["outputs"]), entry["frames_written"],
                 entry["frames_skipped_corrupt"], entry["fps"] or 0)

    def failed(self, source: str, error: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
        click.echo(f"\nerror: {error}" if self.bar is not None else f"error: {error}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()


def _bundle_segmenter(bundle_dir: str, model_name: Optional[str], pretrained: Optional[str],
                      preset: Optional[str], classes: Optional[str], device: str,
                      threads: Optional[int], overrides: dict[str, Any],
                      stages: Optional[dict[str, str]] = None):
    from .runtime.segmenter import Segmenter

    fixed = {"--model": model_name, "--pretrained": pretrained, "--preset": preset,
             **{flag(k): v for k, v in overrides.items() if k not in RUNTIME_SETTINGS}}
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} are fixed when the bundle is exported; re-export "
                        f"with resclip-export to change them (per run: "
                        f"{', '.join(flag(s) for s in RUNTIME_SETTINGS)})")
    vocab = resolve_vocabulary(classes) if classes is not None else None
    return Segmenter.from_bundle(bundle_dir, device=device, threads=threads, classes=vocab,
                                 stages=stages, **{k: overrides[k] for k in RUNTIME_SETTINGS})


def segment_entry() -> None:
    run_command(segment_main)


def export_entry() -> None:
    run_command(export_main)


def _progress(what: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if log.isEnabledFor(logging.INFO):
            end = "\n" if done >= total else ""
            click.echo(f"\r{what}: {done}/{total}", err=True, nl=False)
            click.echo(end, err=True, nl=False)
    return report


@click.command("resclip-export", context_settings={"help_option_names": ["-h", "--help"]})
@method_options
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Bundle directory to write (e.g. models/ade20k).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32",
              show_default=True,
              help="Graph precision: fp32; fp16 for GPUs (matrix products in fp16); int8 for "
                   "CPUs (dynamic: activations quantized at run time; fastest on ONNX "
                   "Runtime); int8-static for CPUs (calibrated QDQ); int8-weights for CPUs "
                   "(int8 weights, the head at fp32; fastest on --device openvino, and the "
                   "closest to fp32). int8 agreement with fp32 is recorded, not enforced.")
@click.option("--calibration", "calibration", multiple=True, type=click.Path(dir_okay=False),
              help="int8-static: a calibration photo (repeat for more; default: the "
                   "package's photo).")
@click.option("--text-encoder/--no-text-encoder", default=False, show_default=True,
              help="Also export the text tower and tokenizer, so resclip-segment --bundle can "
                   "take --classes without torch.")
@click.option("--force", is_flag=True, help="Replace an existing bundle directory.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@user_errors
def export_main(model_name: str, pretrained: str, preset: Optional[str], classes: Optional[str],
                outdir: str, precision: str, calibration: tuple[str, ...], text_encoder: bool,
                force: bool, quiet: bool, **overrides: Any) -> None:
    """Export a CLIP ViT + vocabulary as a verified ONNX bundle for resclip-segment --bundle."""
    _setup_logging(quiet)
    params, vocab = resolve_settings(preset, classes, overrides)
    with needs_extra("resclip-export", "export"):
        from .export.bundle_export import export_bundle
        from .export.clip_loader import load_clip
    if os.path.exists(outdir) and not force:
        raise UserError(f"{outdir} exists; pass --force to replace it")
    if calibration and precision != "int8-static":
        raise UserError("--calibration is for --precision int8-static only")
    from .io import read_image
    photos = [read_image(path) for path in calibration] or None
    start = time.perf_counter()
    clip = load_clip(model_name or "auto", pretrained)
    manifest = export_bundle(clip, vocab, params, outdir, precision=precision,
                             text_encoder=text_encoder, force=force,
                             progress=_progress("text bank prompts"), calibration=photos)
    log.info("wrote %s (%.1f MB, %s) in %.1f s: labels agree %.3f %% with torch", outdir,
             manifest.size_bytes / 1e6, ", ".join(manifest.graphs), time.perf_counter() - start,
             100 * manifest.verification["labels_agreement"])


def _reference_segmenter(model_name: str, pretrained: Optional[str], vocab: Vocabulary,
                         params: ResCLIPParams, device: str):
    with needs_extra("--reference", "export"):
        from .export.reference import reference_segmenter
    return reference_segmenter(model_name, pretrained, vocab, params, device)


@click.command("resclip-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(file_okay=False),
              help="The exported bundle to evaluate.")
@click.option("--dataset", required=True, type=click.Choice(list(DATASETS)),
              help="Benchmark (its mmseg layout, label mapping and preset).")
@click.option("--root", required=True, type=click.Path(),
              help="The dataset folder mmseg's config calls data_root, e.g. "
                   "data/VOCdevkit/VOC2012 or data/ade/ADEChallengeData2016.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N images (in mmseg's order).")
@click.option("--compare", "compare_dir", type=click.Path(file_okay=False), default=None,
              help="A second bundle run on the same images (e.g. fp32 vs int8): both mIoUs "
                   "and their pixel agreement.")
@device_option()
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@runtime_options
@click.option("-o", "--output", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report (metrics, per-class IoU, images) as JSON here.")
@click.option("--save-predictions", "save_dir", type=click.Path(file_okay=False), default=None,
              help="Write the (first) bundle's <id>.png label map and <id>_overlay.jpg of "
                   "each image here, to look at what it got wrong.")
@click.option("-q", "--quiet", is_flag=True, help="Only the table, warnings and errors.")
@user_errors
def eval_main(bundle_dir: str, dataset: str, root: str, limit: Optional[int],
              compare_dir: Optional[str], device: str, threads: Optional[int],
              json_path: Optional[str], save_dir: Optional[str], quiet: bool,
              **overrides: Any) -> None:
    """Evaluate a bundle on a benchmark with mmsegmentation's mIoU: the table on stdout."""
    _setup_logging(quiet)
    from .evaluate import format_table, run_evaluation

    def progress_bar(samples: Any) -> Any:
        if quiet or len(samples) <= 1:
            return contextlib.nullcontext(samples)
        return click.progressbar(samples, label="evaluating", file=sys.stderr, show_pos=True,
                                 item_show_func=lambda _: status["text"])
    status = {"text": ""}

    def on_image(sample: Any, ev: Any) -> None:
        miou = ev.running_miou()
        status["text"] = "" if miou is None else f"mIoU so far {miou:.2f}"

    bundles = [bundle_dir] + ([compare_dir] if compare_dir else [])
    rep, ev = run_evaluation(bundles, dataset, root, limit=limit, device=device,
                             threads=threads, overrides=overrides, save_dir=save_dir,
                             json_path=json_path, on_image=on_image, progress=progress_bar)
    click.echo(format_table(rep))
    if ev.interrupted:
        click.echo(f"error: interrupted after {len(ev.images)} of {ev.samples} images; the "
                   "metrics above cover those", err=True)
        sys.exit(130)
    for path in ev.missing_labels:
        click.echo(f"error: no label map for {path}", err=True)
    for f in ev.failed:
        click.echo(f"error: {f['error']}", err=True)
    if ev.missing_labels or ev.failed:
        click.echo(f"error: {len(ev.missing_labels)} image(s) without a label map and "
                   f"{len(ev.failed)} unreadable, out of {ev.samples}; the metrics count "
                   f"the {len(ev.images)} others", err=True)
        sys.exit(EXIT_SOME_FAILED)


def eval_entry() -> None:
    run_command(eval_main)
