"""Time the torch reference on one image with a bundle's settings (run by resclip-bench in a
subprocess, so the runtime's peak memory is measured without torch). Prints one JSON line."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

from resclip_deploy.bundle import TEXT_BANK_FILE, read_bundle

from .clip_loader import load_clip_from_source
from .reference import ReferenceSegmenter


def main(argv: list[str]) -> None:
    args = json.loads(argv[0])
    bundle = read_bundle(args["bundle"])
    clip = load_clip_from_source(bundle.manifest.source)
    bank = np.load(bundle.file(TEXT_BANK_FILE), allow_pickle=False)
    seg = ReferenceSegmenter(clip.model.visual, bank, bundle.manifest.vocabulary,
                             bundle.manifest.params)
    rgb = np.load(args["array"])
    totals, stages = [], []
    for _ in range(args["runs"]):
        start = time.perf_counter()
        out = seg.segment(rgb, with_probs=False)
        totals.append(time.perf_counter() - start)
        stages.append(out.timings)
    print(json.dumps({"total_s": statistics.median(totals),
                      "stages_s": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    np.save(args["labels_out"], out.labels)


if __name__ == "__main__":
    main(sys.argv[1:])
