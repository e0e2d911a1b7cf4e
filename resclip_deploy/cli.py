"""Command-line entry points. Bad input: one line on stderr naming it, and a non-zero exit."""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, Callable, Optional

import click

from .errors import UserError
from .params import CONNECTIVITIES, CUSTOM, METHODS, MODES, PRESETS, ResCLIPParams, preset_params
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


def method_options(f: Callable) -> Callable:
    """Options shared by resclip-segment and resclip-export (model, vocabulary, method)."""
    options = [
        click.option("--model", "model_name", default="auto", show_default=True,
                     help="open_clip model name (e.g. ViT-B-16-quickgelu), or 'auto' to infer "
                          "the architecture of an OpenAI-format checkpoint file."),
        click.option("--pretrained", required=True,
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
    except click.exceptions.Abort:
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
@click.option("--reference", is_flag=True,
              help="Run the torch reference pipeline (needs the [export] extra).")
@method_options
@click.option("--save-probs", is_flag=True,
              help="Also write <stem>.npz with labels (H,W) and probs (C,H,W) float32.")
@click.option("--device", default="cpu", show_default=True, help="torch device for --reference.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@user_errors
def segment_main(inputs: tuple[str, ...], outdir: str, reference: bool, model_name: str,
                 pretrained: str, preset: Optional[str], classes: Optional[str],
                 save_probs: bool, device: str, quiet: bool, **overrides: Any) -> None:
    """Segment images (files, folders, globs) into OUTDIR."""
    _setup_logging(quiet)
    from .io import expand_inputs, output_stems, read_image, write_segmentation

    if not reference:
        raise UserError("choose the pipeline: --reference (torch); ONNX bundles (--bundle) "
                        "are not available in this version")
    params, vocab = resolve_settings(preset, classes, overrides)
    files = expand_inputs(inputs)
    stems = output_stems(files)
    segmenter = _reference_segmenter(model_name, pretrained, vocab, params, device)
    failed = []
    for path, stem in zip(files, stems):
        start = time.perf_counter()
        try:
            seg = segmenter.segment(read_image(path))
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            failed.append(path)
            continue
        written = write_segmentation(outdir, stem, seg, save_probs)
        log.info("%s -> %s (%dx%d, %.2f s)", path, ", ".join(written), seg.labels.shape[1],
                 seg.labels.shape[0], time.perf_counter() - start)
    if failed:
        if len(files) > 1:
            click.echo(f"error: {len(failed)} of {len(files)} inputs failed: "
                       f"{', '.join(failed)}", err=True)
        sys.exit(EXIT_SOME_FAILED)


def segment_entry() -> None:
    run_command(segment_main)


def _reference_segmenter(model_name: str, pretrained: str, vocab: Vocabulary,
                         params: ResCLIPParams, device: str):
    try:
        import torch
        from .export.clip_loader import load_clip
        from .export.reference import ReferenceSegmenter
    except ImportError as e:
        raise UserError(f"--reference needs the torch side ({e.name} is missing): "
                        "pip install 'resclip-deploy[export]'") from None
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
