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
from .errors import UserError
from .params import CONNECTIVITIES, CUSTOM, METHODS, MODES, PRESETS, ResCLIPParams, preset_params
from .vocab import Vocabulary, preset_vocabulary, resolve_vocabulary

log = logging.getLogger("resclip_deploy")

EXIT_BAD_INPUT = 2      # nothing was done: settings, vocabulary or model unusable
EXIT_SOME_FAILED = 1    # some inputs failed; the others were written
SUMMARY = "summary.json"
# Settings echoed in the summary: the ones a run may change, and the ones that explain it.
RUNTIME_ECHO = ("connectivity", "prob_thd", "temp_thd", "method", "rcs", "sfr", "mode",
                "short_side")


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


def method_options(f: Callable) -> Callable:
    """Options shared by resclip-segment and resclip-export (model, vocabulary, method)."""
    options = [
        click.option("--model", "model_name", default=None,
                     help="open_clip model name (e.g. ViT-B-16-quickgelu), or 'auto' (default) "
                          "to infer the architecture of an OpenAI-format checkpoint file."),
        click.option("--pretrained", default=None,
                     help="open_clip pretrained tag (e.g. openai) or a local checkpoint file."),
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
              help="--bundle: auto|cpu|cuda|tensorrt (auto: TensorRT, CUDA, then CPU). "
                   "--reference: a torch device (auto: cuda if present, else cpu).")
@click.option("--overlay/--no-overlay", default=True, show_default=True,
              help="Also write <stem>_overlay.jpg: the photo, class colours and a legend.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--frame-stride", type=int, default=1, show_default=True,
              help="Video: segment every Nth frame (the output video has fps/N).")
@click.option("--max-frames", type=int, default=None, help="Video: stop after N frames.")
@click.option("--save-frames", is_flag=True,
              help="Video: also write <stem>_frames/<frame>.png label maps.")
@click.option("--save-labels", is_flag=True,
              help="Video: also write <stem>_labels.npz, one label map per frame.")
@click.option("--smooth", type=float, default=None,
              help="Video: temporal smoothing of class probabilities, weight of the past in "
                   "[0, 1) (off by default; see README).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@user_errors
def segment_main(inputs: tuple[str, ...], outdir: str, bundle_dir: Optional[str],
                 reference: bool, model_name: Optional[str], pretrained: Optional[str],
                 preset: Optional[str], classes: Optional[str], save_probs: bool, device: str,
                 overlay: bool, threads: Optional[int], frame_stride: int,
                 max_frames: Optional[int], save_frames: bool, save_labels: bool,
                 smooth: Optional[float], quiet: bool, **overrides: Any) -> None:
    """Segment images (files, folders, globs) into OUTDIR.

    Writes <stem>.png label maps, <stem>_overlay.jpg, <stem>.npz with --save-probs, and
    summary.json (per image: size, seconds, class pixel fractions; the settings used).
    Videos (files, camera indices, stream URLs; --bundle only) give <stem>_overlay.mp4 at the
    same frame rate and size, without audio.
    """
    _setup_logging(quiet)
    from .io import (expand_inputs, image_summary, output_stems, read_image, write_json,
                     write_overlay, write_segmentation)
    from .runtime.video import VideoOptions, is_video_source, segment_video

    videos = [i for i in inputs if is_video_source(i)]
    if videos and bundle_dir is None:
        raise UserError(f"video input {videos[0]} needs --bundle DIR (the torch reference "
                        "segments images only)")

    if reference == (bundle_dir is not None):
        raise UserError("choose one pipeline: --bundle DIR (ONNX, from resclip-export) or "
                        "--reference (torch)")
    if bundle_dir is not None:
        segmenter = _bundle_segmenter(bundle_dir, model_name, pretrained, preset, classes,
                                      device, threads, overrides)
    else:
        if pretrained is None:
            raise UserError("--reference needs --pretrained TAG_OR_FILE")
        params, vocab = resolve_settings(preset, classes, overrides)
        segmenter = _reference_segmenter(model_name or "auto", pretrained, vocab, params, device)
    files = expand_inputs([i for i in inputs if not is_video_source(i)]) if \
        len(videos) < len(inputs) else []
    stems = output_stems(files)
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    interrupted = False
    options = VideoOptions(frame_stride, max_frames, save_frames, save_labels, smooth)
    for source in videos:
        try:
            entry = segment_video(source, segmenter, outdir, options,
                                  None if quiet else _frame_progress)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            failed.append({"input": source, "error": str(e)})
            continue
        runs.append(entry)
        if not quiet:
            click.echo("", err=True)
        log.info("%s -> %s (%d frames, %d skipped as corrupt, %.2f fps)", source,
                 ", ".join(entry["outputs"]), entry["frames_written"],
                 entry["frames_skipped_corrupt"], entry["fps"] or 0)
        if entry["interrupted"]:
            interrupted = True
            break
    todo = [] if interrupted else list(zip(files, stems))
    bar = click.progressbar(todo, label="segmenting", file=sys.stderr, show_pos=True) \
        if len(todo) > 1 and not quiet else contextlib.nullcontext(todo)
    with bar as items:
        for path, stem in items:
            start = time.perf_counter()
            try:
                rgb = read_image(path)
                seg = segmenter.segment(rgb, with_probs=save_probs)
            except UserError as e:
                click.echo(f"\nerror: {e}" if len(files) > 1 and not quiet else f"error: {e}",
                           err=True)
                failed.append({"input": path, "error": str(e)})
                continue
            written = write_segmentation(outdir, stem, seg, save_probs)
            if overlay:
                written.append(write_overlay(outdir, stem, rgb, seg))
            runs.append(image_summary(path, written, seg, time.perf_counter() - start))
            if len(files) == 1:
                log.info("%s -> %s (%dx%d, %.2f s)", path, ", ".join(written),
                         seg.labels.shape[1], seg.labels.shape[0], runs[-1]["seconds"])
    summary = {"pipeline": "bundle" if bundle_dir else "reference",
               "bundle": os.path.abspath(bundle_dir) if bundle_dir else None,
               "settings": {k: getattr(segmenter.params, k) for k in RUNTIME_ECHO},
               "providers": getattr(segmenter, "providers", None),
               "images": runs, "failed": failed}
    write_json(os.path.join(outdir, SUMMARY), summary)
    log.info("%d input(s) written to %s (summary: %s)", len(runs), outdir, SUMMARY)
    if interrupted:
        click.echo("error: interrupted; the output written so far is complete and plays",
                   err=True)
        sys.exit(130)
    if failed:
        if len(files) + len(videos) > 1:
            click.echo(f"error: {len(failed)} of {len(files)} inputs failed: "
                       f"{', '.join(f['input'] for f in failed)}", err=True)
        sys.exit(EXIT_SOME_FAILED)


def _frame_progress(frames: int, seconds: float) -> None:
    click.echo(f"\rframes: {frames}  ({frames / max(seconds, 1e-9):.2f} fps)", err=True, nl=False)


def _bundle_segmenter(bundle_dir: str, model_name: Optional[str], pretrained: Optional[str],
                      preset: Optional[str], classes: Optional[str], device: str,
                      threads: Optional[int], overrides: dict[str, Any]):
    from .runtime.segmenter import RUNTIME_SETTINGS, Segmenter

    fixed = {"--model": model_name, "--pretrained": pretrained, "--preset": preset,
             **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()
                if k not in RUNTIME_SETTINGS}}
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} are fixed when the bundle is exported; re-export "
                        f"with resclip-export to change them (per run: --connectivity, "
                        "--prob-thd, --temp-thd)")
    vocab = resolve_vocabulary(classes) if classes is not None else None
    return Segmenter.from_bundle(bundle_dir, device=device, threads=threads, classes=vocab,
                                 **{k: overrides[k] for k in RUNTIME_SETTINGS})


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
              show_default=True, help="Graph precision (fp16/int8: coming).")
@click.option("--text-encoder/--no-text-encoder", default=False, show_default=True,
              help="Also export the text tower and tokenizer, so resclip-segment --bundle can "
                   "take --classes without torch.")
@click.option("--force", is_flag=True, help="Replace an existing bundle directory.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@user_errors
def export_main(model_name: str, pretrained: str, preset: Optional[str], classes: Optional[str],
                outdir: str, precision: str, text_encoder: bool, force: bool, quiet: bool,
                **overrides: Any) -> None:
    """Export a CLIP ViT + vocabulary as a verified ONNX bundle for resclip-segment --bundle."""
    _setup_logging(quiet)
    if pretrained is None:
        raise UserError("give the weights: --pretrained TAG_OR_FILE")
    params, vocab = resolve_settings(preset, classes, overrides)
    try:
        from .export.bundle_export import export_bundle
        from .export.clip_loader import load_clip
    except ImportError as e:
        raise UserError(f"resclip-export needs the torch side ({e.name} is missing): "
                        "pip install 'resclip-deploy[export]'") from None
    if os.path.exists(outdir) and not force:
        raise UserError(f"{outdir} exists; pass --force to replace it")
    start = time.perf_counter()
    clip = load_clip(model_name or "auto", pretrained)
    manifest = export_bundle(clip, vocab, params, outdir, precision=precision,
                             text_encoder=text_encoder, force=force,
                             progress=_progress("text bank prompts"))
    check = manifest["verification"]
    size = sum(f["bytes"] for f in manifest["files"].values())
    log.info("wrote %s (%.1f MB, %s) in %.1f s: labels agree %.3f %% with torch", outdir,
             size / 1e6, ", ".join(manifest["graphs"]), time.perf_counter() - start,
             100 * check["labels_agreement"])


def _reference_segmenter(model_name: str, pretrained: str, vocab: Vocabulary,
                         params: ResCLIPParams, device: str):
    try:
        import torch
        from .export.clip_loader import load_clip
        from .export.reference import ReferenceSegmenter
    except ImportError as e:
        raise UserError(f"--reference needs the torch side ({e.name} is missing): "
                        "pip install 'resclip-deploy[export]'") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    clip = load_clip(model_name, pretrained)
    log.info("text bank: %d queries x 80 templates", len(vocab.queries))
    start = time.perf_counter()
    segmenter = ReferenceSegmenter.from_clip(clip, vocab, params, device=device)
    log.info("text bank built in %.1f s", time.perf_counter() - start)
    return segmenter


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
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|tensorrt.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--connectivity", type=click.Choice(CONNECTIVITIES), default=None,
              help="Override the bundle's SFR same-entity test for this run.")
@click.option("--prob-thd", type=float, default=None, help="Override the bundle's prob_thd.")
@click.option("--temp-thd", type=float, default=None, help="Override the bundle's temp_thd.")
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
    from .datasets import layout, list_samples
    from .evaluate import bundle_warnings, evaluate, format_table, report
    from .io import write_json
    from .runtime.segmenter import Segmenter

    d = layout(dataset)
    samples = list_samples(d, root, limit)
    bundles = [bundle_dir] + ([compare_dir] if compare_dir else [])
    segmenters = [Segmenter.from_bundle(b, device=device, threads=threads, **overrides)
                  for b in bundles]
    for seg, path in zip(segmenters, bundles):
        for note in bundle_warnings(seg, d, path):
            log.warning("warning: %s", note)
    if len(segmenters) > 1 and segmenters[1].vocab.class_names != segmenters[0].vocab.class_names:
        raise UserError(f"bundles {bundle_dir} and {compare_dir} have different class names; "
                        "compare bundles of one vocabulary")
    log.info("%s: %d images under %s", d.title, len(samples), root)
    status = {"text": ""}

    def on_image(sample: Any, ev: Any) -> None:
        miou = ev.running_miou()
        status["text"] = "" if miou is None else f"mIoU so far {miou:.2f}"

    bar = click.progressbar(samples, label="evaluating", file=sys.stderr, show_pos=True,
                            item_show_func=lambda _: status["text"]) \
        if not quiet and len(samples) > 1 else contextlib.nullcontext(samples)
    with bar as items:
        ev = evaluate(segmenters, bundles, d, items, on_image, save_dir)
    rep = report(ev, {"device": device,
                      "providers": [s.providers for s in segmenters],
                      "params": [s.params.to_dict() for s in segmenters]})
    if json_path:
        write_json(json_path, rep)
    click.echo(format_table(rep))
    if ev.interrupted:
        click.echo(f"error: interrupted after {len(ev.images)} of {len(samples)} images; the "
                   "metrics above cover those", err=True)
        sys.exit(130)
    for path in ev.missing_labels:
        click.echo(f"error: no label map for {path}", err=True)
    for f in ev.failed:
        click.echo(f"error: {f['error']}", err=True)
    if ev.missing_labels or ev.failed:
        click.echo(f"error: {len(ev.missing_labels)} image(s) without a label map and "
                   f"{len(ev.failed)} unreadable, out of {len(samples)}; the metrics count "
                   f"the {len(ev.images)} others", err=True)
        sys.exit(EXIT_SOME_FAILED)


def eval_entry() -> None:
    run_command(eval_main)
