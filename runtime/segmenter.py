"""The torch-free segmenter: the method's stages over a bundle's ONNX graphs and the shared CPU
steps. Sessions are built by runtime/sessions.py and run by runtime/graphs.py.

>>> seg = Segmenter.from_bundle("models/ade20k", device="auto")
>>> result = seg.segment(rgb)          # RGB uint8 (H, W, 3)
>>> result.labels, result.probs, result.class_names
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import numpy as np
import onnxruntime as ort

from resclip_deploy.bundle import Bundle, read_bundle
from resclip_deploy.errors import UserError
from resclip_deploy.geometry import merge_matrices
from resclip_deploy.params import RUNTIME_SETTINGS, ResCLIPParams
from resclip_deploy.pipeline import (Prepared, SFRStep, Timings, output_numpy, prepare,
                                     prepass_step)
from resclip_deploy.postprocess import Segmentation
from resclip_deploy.sfr import connectivity_mask, masked_sfr_matrix, sfr_bias
from resclip_deploy.stages import GRAPH, KERNEL, NUMPY, choose
from resclip_deploy.vocab import Vocabulary

from .cuda_prepass import KernelPrepass, stage_rules
from .graphs import GraphRunner, IOStats
from .providers import check_device_for_precision, max_windows_per_run, memory_of, providers_of
from .sessions import (OUTPUT_PROBS, bundle_sessions, load_text_bank, stage_sessions,
                       text_encoder)
from .text import TextEncoder

log = logging.getLogger("resclip_deploy")

# Encoder outputs the head takes: kept on the GPU between the two graphs.
DEVICE_RESIDENT = ("tokens", "rcs", "window")
# One (frames, queries, rows, W0) float32 tensor of an output graph run: bands of rows beyond.
OUTPUT_BAND_BYTES = 64 << 20
# On a CPU smaller bands: each run's tensors are fresh pages there (no arena), and a band of
# 16 MB took the labels-only output of 336x448, 150 classes, from 0.149 to 0.054 s (1080p:
# 2.40 -> 0.86 s); on a GPU every band is one more run and sync.
CPU_OUTPUT_BAND_BYTES = 16 << 20


@dataclass
class Encoded:
    """The first graph's outputs for a batch of windows, and the windows: numpy arrays on a CPU
    session; on a GPU, OrtValues where the later graphs take them (the CPU gets what its own
    stages need). With SFR the encoder's four outputs; without, the final ``logits``."""

    windows: Any
    tokens: Any = None
    rcs: Any = None
    window: Any = None
    prepass_logits: Any = None
    logits: Any = None

    def feeds(self) -> dict[str, Any]:
        """The tensors as graph feeds (a graph takes the ones it names)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Build:
    """How :meth:`Segmenter.from_bundle` built the sessions: :meth:`Segmenter.with_classes`
    builds a vocabulary's stage graphs alike."""

    device: str = "cpu"
    threads: Optional[int] = None
    cache_dir: Optional[str] = None
    fallback: bool = False          # 'auto': TensorRT graph by graph, CUDA where it refuses


class Segmenter:
    """ResCLIP from a bundle. All windows of an image run as one batch per graph."""

    def __init__(self, bundle: Bundle, sessions: dict[str, ort.InferenceSession],
                 text: Optional[np.ndarray], params: Optional[ResCLIPParams] = None,
                 plan: Optional[dict[str, str]] = None, vocab: Optional[Vocabulary] = None,
                 build: Optional[Build] = None, encoder: Optional[TextEncoder] = None):
        """``sessions``: the bundle's graphs and the stage graphs of ``plan`` (stage ->
        implementation, default: the stage table's choice for the device); ``params``: the
        bundle's with the run's settings (default: the bundle's)."""
        self.bundle = bundle
        self.graphs = GraphRunner(sessions, text)
        self.device_type = self.graphs.device_type
        manifest = bundle.manifest
        self.params = params or manifest.params
        self.plan = plan or choose(self.device_type, self.params.sfr, None,
                                   *stage_rules(self.device_type))
        self._kernel = (KernelPrepass(self.params.logit_scale, manifest.model.patch,
                                      manifest.precision == "fp16", self.device_type)
                        if self.plan.get("prepass") == KERNEL else None)
        self.vocab = vocab or manifest.vocabulary
        self.patch = manifest.model.patch
        self.norm = manifest.preprocess.norm
        self._build, self._encoder = build or Build(), encoder
        # The most windows one run of the graphs takes (TensorRT's profiles end there; on other
        # providers it bounds memory, and a run that size already fills a GPU):
        # segment_many and the video engine pack whole images into runs up to it.
        self.max_windows = max_windows_per_run(manifest)
        self._merge_key: Any = None
        self._merge_cache: Any = None

    @classmethod
    def from_bundle(cls, path: "str | Bundle", device: str = "auto",
                    threads: Optional[int] = None,
                    classes: Optional[Vocabulary] = None, cache_dir: Optional[str] = None,
                    profile_dir: Optional[str] = None,
                    stages: Optional[dict[str, str]] = None, **overrides: Any) -> "Segmenter":
        """``path``: a bundle directory (or a Bundle already read).
        ``classes``: a new vocabulary (needs a bundle exported with --text-encoder).
        ``cache_dir``: TensorRT engine and timing caches (default: providers.default_cache_dir).
        ``profile_dir``: ONNX Runtime profiles of the graph sessions go there.
        ``stages``: stage -> implementation over the stage table's choice for the device
        (resclip_deploy.stages); {'all': 'graph'}: every stage that has a graph.
        ``overrides``: runtime-side settings (connectivity, prob_thd, temp_thd); None = keep."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        check_overrides(overrides)
        bundle = path if isinstance(path, Bundle) else read_bundle(path)
        manifest = bundle.manifest
        device = check_device_for_precision(device, manifest.precision)
        if classes is not None and manifest.text_encoder is None:
            raise UserError(f"bundle {bundle.path} has a fixed vocabulary; to choose classes at "
                            "run time re-export it with resclip-export --text-encoder")
        build = Build(device, threads, cache_dir, fallback=device == "auto")
        sessions, device = bundle_sessions(bundle, device, threads, cache_dir, profile_dir)
        build = Build(device, threads, cache_dir, build.fallback)
        params = manifest.params.replace(**overrides)
        vocab = classes or manifest.vocabulary
        memory = memory_of(next(iter(sessions.values())))
        plan = choose(memory, params.sfr, stages, *stage_rules(memory, stages))
        sessions.update(stage_sessions(manifest, params, vocab, plan, device, threads, cache_dir,
                                       profile_dir, build.fallback))
        for name, session in sessions.items():
            log.info("%s graph on %s", name, ", ".join(providers_of(session)))
        text = load_text_bank(bundle) if manifest.text_input else None
        encoder = None
        if classes is not None:
            encoder = text_encoder(bundle, device, threads, cache_dir, build.fallback)
            text = encoder.bank(classes.queries)
        seg = cls(bundle, sessions, text, params, plan, vocab, build, encoder)
        if seg._kernel is not None:
            log.info("prepass on %s", seg._kernel.provider)
        return seg

    def with_classes(self, classes: Vocabulary) -> "Segmenter":
        """A segmenter for another vocabulary (a bundle exported with --text-encoder): the same
        network sessions, its own text bank and vocabulary-bound stage graphs. Nothing of one
        vocabulary is seen by the other; the text tower is loaded once, on first use."""
        manifest = self.bundle.manifest
        if manifest.text_encoder is None:
            raise UserError(f"bundle {self.bundle.path} has a fixed vocabulary; to choose classes "
                            "at run time re-export it with resclip-export --text-encoder")
        b = self._build
        if self._encoder is None:
            self._encoder = text_encoder(self.bundle, b.device, b.threads, b.cache_dir,
                                         b.fallback)
        networks = {n: s for n, s in self.sessions.items() if n in manifest.graphs}
        stages = stage_sessions(manifest, self.params, classes, self.plan, b.device, b.threads,
                                b.cache_dir, None, b.fallback)
        return type(self)(self.bundle, {**networks, **stages},
                          self._encoder.bank(classes.queries), self.params, self.plan, classes,
                          b, self._encoder)

    # What the graphs run on and what crossed (runtime/graphs.py)

    @property
    def sessions(self) -> dict[str, Any]:
        return self.graphs.sessions

    @property
    def text(self) -> Optional[np.ndarray]:
        return self.graphs.text

    @property
    def io(self) -> IOStats:
        """What the graph runs cost outside compute so far (a fresh IOStats starts the count
        again)."""
        return self.graphs.io

    @io.setter
    def io(self, stats: IOStats) -> None:
        self.graphs.io = stats

    @property
    def providers(self) -> dict[str, list[str]]:
        """Graph -> the providers that bound, TensorRT's with its precision; the pre-pass's
        kernels under 'prepass' when they run it."""
        out = {name: providers_of(s) for name, s in self.sessions.items()}
        if self._kernel is not None:
            out["prepass"] = [self._kernel.provider]
        return out

    def run_graph(self, graph: str, feeds: dict[str, Any],
                  keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        """:meth:`GraphRunner.run`: one graph; outputs in ``keep_on_device`` stay on a GPU."""
        return self.graphs.run(graph, feeds, keep_on_device)

    def host(self, value: Any) -> np.ndarray:
        """A stage's tensor on the host: numpy as is, a GPU OrtValue copied down (counted)."""
        return self.graphs.host(value)

    def forward_windows(self, windows: np.ndarray, times: Optional[Timings] = None,
                        ) -> tuple[Any, Optional[SFRStep]]:
        """(K, 3, h, w) float32 normalised windows (or (K, h, w, 3) uint8 crops when the
        normalise stage is a graph) -> (K, Q, N) patch cosine logits and the SFR step between
        the graphs (None without SFR). With an output graph on a GPU the logits stay there.
        One run of each graph: under TensorRT at most :attr:`max_windows` windows."""
        times = Timings() if times is None else times
        if windows.dtype != np.uint8:
            windows = np.ascontiguousarray(windows, dtype=np.float32)
        with times("encoder"):
            enc = self.encode(windows)
        with times("sfr"):
            step = self.refine(enc)
        with times("head"):
            return self.head(enc, step), step

    # The stages of a batch of windows (resclip_deploy.stages); the video engine runs them in
    # separate threads. What one graph hands to the next stays on a GPU (keep_on_device).

    def encode(self, windows: np.ndarray) -> Encoded:
        """Windows -> the first graph's outputs and the normalised ``windows``."""
        if windows.dtype == np.uint8:
            windows = self.run_graph("normalise", {"frames": windows},
                                     keep_on_device=("windows",))["windows"]
        if "segmenter" in self.sessions:
            keep = ("logits",) if self.plan["output"] == GRAPH else ()
            enc = self.run_graph("segmenter", {"pixels": windows}, keep_on_device=keep)
        else:
            keep = DEVICE_RESIDENT + (("prepass_logits",) if self.plan["prepass"] != NUMPY
                                      else ())
            enc = self.run_graph("encoder", {"pixels": windows}, keep_on_device=keep)
        return Encoded(windows, **enc)

    def refine(self, enc: Encoded, workers: Optional[int] = None) -> Optional[SFRStep]:
        """SFR between the graphs (None without SFR): pre-pass, connectivity, SFR matrix, each
        as the plan says. With graphs on a GPU only the patch labels come down and the
        connectivity mask goes up."""
        if "segmenter" in self.sessions:
            return None
        argmax, maxprob, grids = self.prepass(enc, workers)
        return SFRStep(argmax, maxprob, grids, *self.sfr_matrix(grids))

    def prepass(self, enc: Encoded, workers: Optional[int] = None) -> tuple[Any, ...]:
        """-> pre-pass argmax and max probability (K, h, w), patch labels (K, gh, gw)."""
        p = self.params
        if self.plan["prepass"] == NUMPY:
            return prepass_step(self.host(enc.prepass_logits), self.host(enc.windows), p,
                                self.patch, workers)
        if self._kernel is not None:
            windows = enc.windows
            if self.device_type != "cpu" and not isinstance(windows, ort.OrtValue):
                windows = self.graphs.upload_once(windows)
            start = time.perf_counter()
            argmax, maxprob, grids = self._kernel(enc.prepass_logits, windows, p.temp_thd)
            self.graphs.count(graph_s=time.perf_counter() - start, runs=1)
            return argmax, maxprob, grids
        on_device = self.plan["connectivity"] == GRAPH and self.plan["sfr_matrix"] == GRAPH
        out = self.run_graph(
            "prepass", {"prepass_logits": enc.prepass_logits, "windows": enc.windows,
                        "temp_thd": np.array(p.temp_thd, dtype=np.float32)},
            keep_on_device=("prepass_argmax", "prepass_maxprob")
            + (("patch_labels",) if on_device else ()))
        return out["prepass_argmax"], out["prepass_maxprob"], out["patch_labels"]

    def sfr_matrix(self, grids: Any) -> tuple[Any, Any]:
        """(K, gh, gw) patch labels -> SFR matrices and the head's bias (K, T, T)."""
        p = self.params
        if self.plan["connectivity"] == NUMPY:
            connected = np.stack([connectivity_mask(g, p.connectivity) for g in self.host(grids)])
        else:
            connected = self.run_graph("connectivity", {"patch_labels": grids},
                                       keep_on_device=("connected",))["connected"]
        if self.plan["sfr_matrix"] == NUMPY:
            grids, connected = self.host(grids), self.host(connected)
            mats = np.stack([masked_sfr_matrix(g, c, p.gaussian_std)
                             for g, c in zip(grids, connected)])
            return mats, np.stack([sfr_bias(m) for m in mats])
        out = self.run_graph("sfr_matrix", {"patch_labels": grids, "connected": connected},
                             keep_on_device=("sfr_matrix", "sfr_bias"))
        return out["sfr_matrix"], out["sfr_bias"]

    def head(self, enc: Encoded, step: Optional[SFRStep]) -> Any:
        """-> (K, Q, N) patch cosine logits (kept on a GPU for an output graph)."""
        if step is None:
            return enc.logits
        keep = ("logits",) if self.plan["output"] == GRAPH else ()
        return self.run_graph("head", {**enc.feeds(), "sfr_bias": step.bias},
                              keep_on_device=keep)["logits"]

    def run_windows(self, windows: np.ndarray, times: Optional[Timings] = None) -> np.ndarray:
        return self.host(self.forward_windows(windows, times)[0])

    def prepare(self, rgb: np.ndarray) -> Prepared:
        """RGB uint8 -> windows for :meth:`forward_windows` (uint8 crops for a normalise
        graph: a quarter of the float bytes go up)."""
        norm = None if self.plan["normalise"] == GRAPH else self.norm
        return prepare(rgb, self.params, self.patch, norm)

    def finish(self, items: list[Prepared], logits: Any, with_probs: Optional[bool] = None,
               times: Optional[Timings] = None) -> list[Segmentation]:
        """(sum of K, Q, N) logits of ``items`` (a video batch, one image, or images of any
        sizes) -> one Segmentation each, at its original size.

        ``with_probs``: True computes the (C, H0, W0) probabilities now, False never. None (the
        default) computes them now on a CPU; on a GPU only the labels come down and the
        probabilities are made on the device when ``probs`` is first read (the device keeps the
        logits until then): a 336x448 ADE20K image has 90 MB of them, a 1080p frame 1.2 GB."""
        times = Timings() if times is None else times
        if with_probs is None and self.device_type == "cpu":
            with_probs = True
        if with_probs is None and self.plan["output"] == GRAPH:
            return self._deferred_probs(items, logits, times)
        with_probs = True if with_probs is None else with_probs     # numpy output: on the host
        sizes = {(i.image_hw, i.input_hw) for i in items}
        if self.plan["output"] == NUMPY or len(sizes) > 1:
            parts = np.split(self.host(logits), np.cumsum([len(i.windows) for i in items])[:-1])
            if self.plan["output"] == NUMPY:
                return [output_numpy(item, part, self.params, self.patch, self.vocab, with_probs,
                               times) for item, part in zip(items, parts)]
            # one output graph run takes images of one size
            return [self.finish([item], part, with_probs, times)[0]
                    for item, part in zip(items, parts)]
        first = items[0]
        frames, (h0, w0) = len(items), first.image_hw
        names = self.vocab.class_names
        labels = np.empty((frames, h0, w0), dtype=np.int32)
        probs = np.empty((frames, len(names), h0, w0), dtype=np.float32) if with_probs else None
        graph = OUTPUT_PROBS if with_probs else "output"
        with times("output"):
            rows, cols = self._merge_matrices(first)
            # Row bands keep the graph's (F, Q, band, W0) tensors within a budget whatever
            # the image size (a 24-megapixel photo would otherwise need ~16 GB).
            budget = OUTPUT_BAND_BYTES if self.device_type != "cpu" else CPU_OUTPUT_BAND_BYTES
            band = max(1, budget // (frames * len(self.vocab.queries) * w0 * 4))
            for r0 in range(0, h0, band):
                out = self.run_graph(graph, {
                    "logits": logits, "rows": rows[r0:r0 + band], "cols": cols,
                    "prob_thd": np.array(self.params.prob_thd, dtype=np.float32)})
                labels[:, r0:r0 + band] = out["labels"]
                if probs is not None:
                    probs[:, :, r0:r0 + band] = out["probs"]
        results = [Segmentation(labels[i], None if probs is None else probs[i], names)
                   for i in range(frames)]
        for seg in results:
            seg.timings = dict(times)
        return results

    def _deferred_probs(self, items: list[Prepared], logits: Any,
                        times: Timings) -> list[Segmentation]:
        """Labels now; each item's probabilities from one output-graph run over the batch when
        the first of them is read."""
        done = self.finish(items, logits, False, times)
        batch: list[list[np.ndarray]] = []

        def load(i: int) -> np.ndarray:
            if not batch:
                batch.append([s.probs for s in self.finish(items, logits, True)])
            return batch[0][i]
        return [DeferredProbs(seg, functools.partial(load, i)) for i, seg in enumerate(done)]

    def _merge_matrices(self, prepared: Prepared) -> tuple[np.ndarray, Any]:
        """The output graph's rows and cols for one image geometry (cached: a video's frames
        share it). cols, which every row band takes whole, goes up once (1080p: 0.54 MB, which
        its 19 bands of 150 classes would otherwise upload 19 times per frame)."""
        key = (prepared.input_hw, prepared.image_hw, prepared.window_hw)
        if self._merge_key != key:
            grid = tuple(side // self.patch for side in prepared.window_hw)
            rows, cols = merge_matrices(prepared.boxes, prepared.input_hw, prepared.image_hw,
                                        grid)
            self._merge_cache = (rows, self.graphs.upload_once(cols))
            self._merge_key = key
        return self._merge_cache

    def segment(self, rgb: np.ndarray, with_probs: Optional[bool] = None) -> Segmentation:
        """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0); ``with_probs=False`` skips the
        (C, H0, W0) probabilities (labels only, less memory); None: now on a CPU, on a GPU when
        first read (:meth:`finish`)."""
        times = Timings()
        with times("preprocess"):
            prepared = self.prepare(rgb)
        logits, _ = self.forward_windows(prepared.windows, times)
        return self.finish([prepared], logits, with_probs, times)[0]

    def segment_many(self, rgbs: list[np.ndarray], with_probs: Optional[bool] = None,
                     ) -> list[Segmentation]:
        """Several images, their windows through the graphs in one run per group of equal
        window shape (slide mode: every window is crop x crop, whatever the image size), each
        result equal to :meth:`segment` of its image. What pays on a GPU, where one image
        leaves the device idle between small runs; a server batches its clients with it.
        A group with more than :attr:`max_windows` windows runs in several, whole images each."""
        times = Timings()
        with times("preprocess"):
            prepared = [self.prepare(rgb) for rgb in rgbs]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault(item.windows.shape[1:], []).append(i)
        results: list[Optional[Segmentation]] = [None] * len(rgbs)
        for group in groups.values():
            for run in pack_runs([len(prepared[i].windows) for i in group], self.max_windows):
                members = [group[j] for j in run]
                logits, _ = self.forward_windows(
                    np.concatenate([prepared[i].windows for i in members]), times)
                done = self.finish([prepared[i] for i in members], logits, with_probs, times)
                for i, seg in zip(members, done):
                    results[i] = seg
        return results


def pack_runs(windows: list[int], cap: int) -> list[list[int]]:
    """Items (their window counts, in order) -> runs of item indices with at most ``cap``
    windows each. An item is never split: the output graph merges all windows of an image in
    one run (the graphs before it work per window). One with more than ``cap`` runs alone."""
    runs: list[list[int]] = []
    total = 0
    for i, n in enumerate(windows):
        if runs and total + n <= cap:
            runs[-1].append(i)
            total += n
        else:
            runs.append([i])
            total = n
    return runs


class DeferredProbs(Segmentation):
    """A Segmentation whose probabilities are computed (on the GPU) and fetched when ``probs``
    is first read; until then only the labels have crossed to the host."""

    def __init__(self, seg: Segmentation, load: Callable[[], np.ndarray]):
        self._load: Optional[Callable[[], np.ndarray]] = load
        super().__init__(seg.labels, None, seg.class_names, seg.timings)

    @property  # type: ignore[override]
    def probs(self) -> Optional[np.ndarray]:
        if self._load is not None:
            self._probs, self._load = self._load(), None
        return self._probs

    @probs.setter
    def probs(self, value: Optional[np.ndarray]) -> None:
        self._probs = value

    def __repr__(self) -> str:         # without computing the probabilities
        return (f"DeferredProbs(labels={self.labels.shape}, classes={len(self.class_names)}, "
                f"probs={'pending' if self._load else 'fetched'})")


def check_overrides(overrides: dict[str, Any]) -> None:
    unknown = set(overrides) - set(RUNTIME_SETTINGS)
    if unknown:
        raise UserError(f"{sorted(unknown)} are fixed in the exported graphs; only "
                        f"{', '.join(RUNTIME_SETTINGS)} can change at run time (re-export "
                        "for the others)")
