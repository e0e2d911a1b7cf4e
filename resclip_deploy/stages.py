"""The stages of one batch of windows, their tensors, and the implementations each has.

``network`` stages are the bundle's own graphs (encoder and head with SFR, ``segmenter`` without).
The others have a numpy implementation (:mod:`pipeline`, :mod:`sfr`, :mod:`geometry`,
:mod:`postprocess`) and an ONNX graph (:mod:`stage_graphs`, built at load, held to the numpy one
by tests). A GPU provider runs every graph-capable stage as its graph, so tensors stay on the
device between them; only connectivity (OpenCV / the line walk on a 14x14 grid) comes to the CPU.
On the CPU provider each stage takes whichever was measured faster there (BENCHMARKS.md):
PAMR is ~10x faster as a sparse product than as tensor-wide graph ops; the SFR matrix and the
output are faster as graphs. On a GPU the pre-pass prefers its CUDA kernels (:mod:`pamr_cuda`:
one pass over the masks per PAMR step, where the graph makes ~111), and takes the graph where
they cannot run (no numba-cuda, or no device numba can use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional

from .errors import UserError

NUMPY, GRAPH, NETWORK, KERNEL = "numpy", "graph", "network", "kernel"
# What the table takes instead of an implementation that cannot run here.
FALLBACK = {KERNEL: GRAPH}


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    implementations: tuple[str, ...]
    cpu: str          # used on the CPU provider
    gpu: str          # used on GPU providers
    sfr_only: bool = False


STAGES: tuple[Stage, ...] = (
    # uint8 crops (K, h, w, 3) -> normalised float32 windows (K, 3, h, w)
    Stage("normalise", ("frames",), ("windows",), (NUMPY, GRAPH), cpu=NUMPY, gpu=GRAPH),
    Stage("encoder", ("windows",), ("tokens", "rcs", "window", "prepass_logits"), (NETWORK,),
          cpu=NETWORK, gpu=NETWORK, sfr_only=True),
    # upsample, PAMR, softmax, temp_thd, patch vote (docs/method.md §5)
    Stage("prepass", ("prepass_logits", "windows", "temp_thd"),
          ("patch_labels", "prepass_argmax", "prepass_maxprob"), (NUMPY, GRAPH, KERNEL),
          cpu=NUMPY, gpu=KERNEL, sfr_only=True),
    # same-entity test (docs/method.md §6): on the CPU between the graphs, or as a graph
    Stage("connectivity", ("patch_labels",), ("connected",), (NUMPY, GRAPH), cpu=NUMPY,
          gpu=NUMPY, sfr_only=True),
    Stage("sfr_matrix", ("patch_labels", "connected"), ("sfr_matrix", "sfr_bias"),
          (NUMPY, GRAPH), cpu=GRAPH, gpu=GRAPH, sfr_only=True),
    Stage("head", ("tokens", "rcs", "window", "sfr_bias"), ("logits",), (NETWORK,),
          cpu=NETWORK, gpu=NETWORK, sfr_only=True),
    Stage("segmenter", ("windows",), ("logits",), (NETWORK,), cpu=NETWORK, gpu=NETWORK),
    # window merge, resize to the original size, synonyms, prob_thd (docs/method.md §2.5, §2.6)
    Stage("output", ("logits", "rows", "cols", "prob_thd"), ("labels", "probs"),
          (NUMPY, GRAPH), cpu=GRAPH, gpu=GRAPH),
)
BY_NAME = {s.name: s for s in STAGES}


def choose(device_type: str, sfr: bool, requested: Optional[Mapping[str, str]] = None,
           skip: Collection[str] = (), refused: Optional[Mapping[str, str]] = None,
           ) -> dict[str, str]:
    """Stage -> implementation for a device ('cpu' or a GPU) and a bundle (with or without SFR).

    ``requested`` overrides the table's choice per stage ("all" sets every stage that has a
    graph; all=gpu takes the GPU column on any device: how resclip-bench measures the GPU
    configuration's host work here); unknown stages or implementations are refused.
    ``skip``: implementations the table must not choose here (it takes :data:`FALLBACK`'s);
    ``refused``: implementation -> why a request for it cannot run here.
    """
    requested = dict(requested or {})
    refused = refused or {}
    on_gpu = device_type != "cpu" or requested.get("all") == "gpu"
    if requested.get("all") == "gpu":
        del requested["all"]
    plan = {s.name: (s.gpu if on_gpu else s.cpu) for s in STAGES if _applies(s, sfr)}
    plan = {name: FALLBACK[impl] if impl in skip else impl for name, impl in plan.items()}
    for name, impl in requested.items():
        names = [s for s in plan if GRAPH in BY_NAME[s].implementations] if name == "all" \
            else [name]
        for stage in names:
            if stage not in plan:
                raise UserError(f"stage {stage!r}: not a stage of this bundle; choose from "
                                f"{', '.join(plan)} (or all)")
            choices = BY_NAME[stage].implementations
            if impl not in choices:
                raise UserError(f"stage {stage}={impl!r}: choose {' or '.join(choices)}")
            if impl in refused:
                raise UserError(f"stage {stage}={impl}: {refused[impl]}")
            plan[stage] = impl
    return plan


def _applies(stage: Stage, sfr: bool) -> bool:
    """Without SFR one network graph (``segmenter``) replaces the SFR stages."""
    if stage.name == "segmenter":
        return not sfr
    return sfr or not stage.sfr_only


def parse_stages(text: Optional[str]) -> dict[str, str]:
    """'prepass=graph,output=numpy' -> {'prepass': 'graph', 'output': 'numpy'}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, impl = part.strip().partition("=")
        if not sep or not name or not impl:
            raise UserError(f"--stages {text!r}: write stage=implementation pairs separated by "
                            "commas, e.g. prepass=graph,output=numpy")
        out[name.strip()] = impl.strip()
    return out
