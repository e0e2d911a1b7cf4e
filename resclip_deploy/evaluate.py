"""resclip-eval's loop: bundles over a benchmark's images, mmseg's IoU metric (no torch).

Each image is decoded once and segmented by every bundle (``--compare``), with the bundle's own
pre-processing (its preset's short side, mode and thresholds, docs/method.md §1, §2), at the
original size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .datasets import DatasetLayout, Sample, read_label_map
from .errors import UserError
from .io import read_image, write_overlay, write_segmentation
from .metrics import IoUAccumulator, areas, reduce_zero_label
from .params import preset_params

log = logging.getLogger("resclip_deploy")

# What each image adds to the report: after it, the running metrics can be shown.
ImageCallback = Callable[[Sample, "Evaluation"], None]


@dataclass
class Evaluation:
    dataset: DatasetLayout
    bundles: list[str]
    class_names: list[str]
    accumulators: list[IoUAccumulator]
    agree: int = 0                   # pixels where the first two bundles give the same label
    images: list[dict[str, Any]] = field(default_factory=list)
    missing_labels: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    interrupted: bool = False        # Ctrl-C: the metrics cover the images before it
    samples: int = 0                 # images listed for the run

    @property
    def agreement(self) -> Optional[float]:
        compared = sum(w * h for w, h in (i["size"] for i in self.images))
        return self.agree / compared if len(self.bundles) > 1 and compared else None

    def running_miou(self) -> Optional[float]:
        return self.accumulators[0].summary(self.class_names)["mIoU"]


def bundle_warnings(segmenter: Any, d: DatasetLayout, path: str) -> list[str]:
    """Refuse a bundle whose classes cannot match the dataset's; say where it departs from the
    dataset's preset (the bundle's own settings are used, never changed)."""
    classes = segmenter.vocab.class_names
    if len(classes) != d.num_classes:
        raise UserError(f"bundle {path} has {len(classes)} classes, {d.name} has "
                        f"{d.num_classes}: export one with resclip-export --preset {d.name}")
    notes = []
    source = segmenter.bundle.manifest.vocabulary.source
    if source != f"preset:{d.name}":
        notes.append(f"bundle {path}: vocabulary from {source}, not the {d.name} preset's")
    preset = preset_params(d.name)
    differ = [f"{k}={getattr(segmenter.params, k)!r} (preset {getattr(preset, k)!r})"
              for k in preset.to_dict()
              if getattr(segmenter.params, k) != getattr(preset, k)]
    if differ:
        notes.append(f"bundle {path}: settings differ from the {d.name} preset: "
                     + ", ".join(differ))
    return notes


def _ground_truth(sample: Sample, d: DatasetLayout, shape: tuple[int, int]) -> np.ndarray:
    label = read_label_map(sample.label)
    if d.reduce_zero_label:
        label = reduce_zero_label(label)
    if label.shape != shape:
        raise UserError(f"label map {sample.label} is {label.shape[1]}x{label.shape[0]}, its "
                        f"image {shape[1]}x{shape[0]}")
    return label


def evaluate(segmenters: Sequence[Any], bundles: Sequence[str], d: DatasetLayout,
             samples: Sequence[Sample], on_image: Optional[ImageCallback] = None,
             save_dir: Optional[str] = None) -> Evaluation:
    """Segment every sample with every segmenter and accumulate the metrics.

    Samples without a label file are listed in ``missing_labels``; unreadable ones in
    ``failed``; neither counts in the metrics. ``save_dir``: the first bundle's label map and
    overlay of each image go there (<id>.png, <id>_overlay.jpg; '/' in ids becomes '__').
    """
    ev = Evaluation(d, list(bundles), list(segmenters[0].vocab.class_names),
                    [IoUAccumulator(d.num_classes) for _ in segmenters])
    try:
        for sample in samples:
            _evaluate_one(segmenters, sample, ev, save_dir)
            if on_image is not None:
                on_image(sample, ev)
    except KeyboardInterrupt:
        ev.interrupted = True
    return ev


def _evaluate_one(segmenters: Sequence[Any], sample: Sample, ev: Evaluation,
                  save_dir: Optional[str]) -> None:
    start = time.perf_counter()
    if sample.label is None:
        ev.missing_labels.append(sample.image)
        return
    try:
        rgb = read_image(sample.image)
        gt = _ground_truth(sample, ev.dataset, rgb.shape[:2])
        segs = [s.segment(rgb, with_probs=False) for s in segmenters]
    except UserError as e:
        ev.failed.append({"image": sample.image, "error": str(e)})
        return
    accuracy = []
    for acc, seg in zip(ev.accumulators, segs):
        counts = areas(seg.labels, gt, ev.dataset.num_classes)
        acc.add_areas(counts)
        labelled = counts[2].sum()
        accuracy.append(round(100 * counts[0].sum() / labelled, 4) if labelled else None)
    if len(segs) > 1:
        ev.agree += int(np.count_nonzero(segs[0].labels == segs[1].labels))
    if save_dir is not None:
        stem = sample.id.replace("/", "__").replace(os.sep, "__")
        write_segmentation(save_dir, stem, segs[0], save_probs=False)
        write_overlay(save_dir, stem, rgb, segs[0])
    ev.images.append({"id": sample.id, "size": [rgb.shape[1], rgb.shape[0]],
                      "pixel_accuracy": accuracy,
                      "seconds": round(time.perf_counter() - start, 4)})


def report(ev: Evaluation, settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: per bundle mIoU / aAcc / mAcc and per-class IoU, in percent."""
    results = []
    for path, acc in zip(ev.bundles, ev.accumulators):
        results.append({"bundle": path, **acc.summary(ev.class_names)})
    return {
        "dataset": ev.dataset.name, "title": ev.dataset.title,
        "metric": "mmseg IoUMetric (ignore index 255"
                  + (", reduce_zero_label" if ev.dataset.reduce_zero_label else "") + ")",
        "images_evaluated": len(ev.images), "interrupted": ev.interrupted,
        "settings": settings, "results": results,
        "pixel_agreement": ev.agreement,
        "paper_mIoU": ev.dataset.paper_miou,
        "missing_labels": ev.missing_labels, "failed": ev.failed, "images": ev.images,
    }


def _pct(x: Optional[float]) -> str:
    return "   -  " if x is None else f"{x:6.2f}"


def format_table(rep: dict[str, Any]) -> str:
    """Per-class IoU / Acc of each bundle (numbered when compared), then the summary lines."""
    results = rep["results"]
    tags = [f" {i + 1}" for i in range(len(results))] if len(results) > 1 else [""]
    rows = results[0]["per_class"]
    width = max(len(c["class"]) for c in rows)
    head = f"{'class':<{width}}" + "".join(f" | {'IoU' + t:>6} | {'Acc' + t:>6}" for t in tags)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(rows):
        lines.append(f"{row['class']:<{width}}" + "".join(
            f" | {_pct(r['per_class'][i]['IoU'])} | {_pct(r['per_class'][i]['Acc'])}"
            for r in results))
    lines.append("")
    for t, r in zip(tags, results):
        lines.append(f"{t.strip() + ': ' if t else ''}{r['bundle']}: mIoU {_pct(r['mIoU']).strip()}"
                     f"  aAcc {_pct(r['aAcc']).strip()}  mAcc {_pct(r['mAcc']).strip()}  "
                     f"({rep['images_evaluated']} images, {rep['dataset']})")
    if rep["pixel_agreement"] is not None:
        lines.append(f"pixel agreement of 1 and 2: {100 * rep['pixel_agreement']:.3f} %")
    if rep["paper_mIoU"] is not None:
        lines.append(f"paper (ResCLIP on NACLIP, ViT-B/16, OpenAI weights, all images): mIoU "
                     f"{rep['paper_mIoU']:.1f}")
    return "\n".join(lines)


def run_evaluation(bundles: Sequence[str], dataset: str, root: str, limit: Optional[int] = None,
                   device: str = "auto", threads: Optional[int] = None,
                   overrides: Optional[dict[str, Any]] = None, save_dir: Optional[str] = None,
                   json_path: Optional[str] = None, on_image: Optional[ImageCallback] = None,
                   progress: Optional[Callable[[Sequence[Sample]], Any]] = None,
                   ) -> tuple[dict[str, Any], Evaluation]:
    """``resclip-eval``: the bundles (a second one compared with the first) on ``dataset``
    under ``root`` -> (the report, the evaluation). ``overrides``: connectivity / prob_thd /
    temp_thd for this run. ``progress(samples)``: a context manager yielding the samples (a
    progress bar); ``json_path``: the report is also written there. Departures from the
    dataset's preset are logged as warnings."""
    from .datasets import layout, list_samples
    from .io import write_json
    from .runtime.segmenter import Segmenter

    d = layout(dataset)
    samples = list_samples(d, root, limit)
    segmenters = [Segmenter.from_bundle(b, device=device, threads=threads, **(overrides or {}))
                  for b in bundles]
    for seg, path in zip(segmenters, bundles):
        for note in bundle_warnings(seg, d, path):
            log.warning("warning: %s", note)
    if len(segmenters) > 1 and segmenters[1].vocab.class_names != segmenters[0].vocab.class_names:
        raise UserError(f"bundles {bundles[0]} and {bundles[1]} have different class names; "
                        "compare bundles of one vocabulary")
    log.info("%s: %d images under %s", d.title, len(samples), root)
    with (progress or contextlib.nullcontext)(samples) as items:
        ev = evaluate(segmenters, bundles, d, items, on_image, save_dir)
    ev.samples = len(samples)
    rep = report(ev, {"device": device, "providers": [s.providers for s in segmenters],
                      "params": [s.params.to_dict() for s in segmenters]})
    if json_path:
        write_json(json_path, rep)
    return rep, ev
