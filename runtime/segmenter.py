"""The torch-free segmenter: a bundle's ONNX graphs in ONNX Runtime + the shared CPU steps.

>>> seg = Segmenter.from_bundle("models/ade20k", device="auto")
>>> result = seg.segment(rgb)          # RGB uint8 (H, W, 3)
>>> result.labels, result.probs, result.class_names
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from resclip_deploy.bundle import TEXT_BANK_FILE, Bundle, graph_layout, read_bundle
from resclip_deploy.errors import UserError
from resclip_deploy.pipeline import SFRStep, Timings, segment_image, sfr_step
from resclip_deploy.postprocess import Segmentation
from resclip_deploy.vocab import Vocabulary

from .providers import check_device_for_precision, create_session, device_of, gpu_options
from .text import TextEncoder

log = logging.getLogger("resclip_deploy")

@dataclass
class IOStats:
    """What the graph runs cost outside compute: seconds inside ONNX Runtime, and the bytes that
    cross between host and device in the GPU configuration (on a CPU session, what would cross
    there: inputs and fetched outputs, not what a GPU keeps between graphs)."""

    graph_s: float = 0.0
    to_device: int = 0
    to_host: int = 0
    runs: int = 0


# Encoder outputs the head takes: kept on the GPU between the two graphs.
DEVICE_RESIDENT = ("tokens", "rcs", "window")
# Settings applied on CPU between or after the graphs; a run may change them.
RUNTIME_SETTINGS = ("connectivity", "prob_thd", "temp_thd")


def load_text_bank(bundle: Bundle) -> np.ndarray:
    """The bundle's ``text_bank.npy``: (queries, embed_dim) float32, one row per query."""
    manifest = bundle.manifest
    want = (len(manifest.vocabulary.queries), manifest.model.embed_dim)
    try:
        bank = np.load(bundle.file(TEXT_BANK_FILE), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"bundle {bundle.path}: {TEXT_BANK_FILE} is unreadable ({e}); export "
                        "the bundle again") from None
    if bank.dtype != np.float32 or bank.shape != want:
        raise UserError(f"bundle {bundle.path}: {TEXT_BANK_FILE} holds {bank.dtype} "
                        f"{bank.shape}, not float32 {want} (queries x embedding); export the "
                        "bundle again")
    return bank


class Segmenter:
    """ResCLIP from a bundle. All windows of an image run as one batch per graph."""

    def __init__(self, bundle: Bundle, sessions: dict[str, ort.InferenceSession],
                 text: Optional[np.ndarray], overrides: dict[str, Any]):
        unknown = set(overrides) - set(RUNTIME_SETTINGS)
        if unknown:
            raise UserError(f"{sorted(unknown)} are fixed in the exported graphs; only "
                            f"{', '.join(RUNTIME_SETTINGS)} can change at run time (re-export "
                            "for the others)")
        self.bundle, self.sessions, self.text = bundle, sessions, text
        # 'cuda' when the graphs run on a GPU provider, else 'cpu' (read once: run_graph asks)
        first = next(iter(sessions.values())).get_providers()[0]
        self.device_type = "cpu" if first == "CPUExecutionProvider" else "cuda"
        manifest = bundle.manifest
        self.params = manifest.params.replace(**overrides)
        self.vocab = manifest.vocabulary
        self.patch = manifest.model.patch
        self.norm = manifest.preprocess.norm
        self.io = IOStats()
        # Arrays a CPU session hands from one graph to the next (a GPU keeps them), by id; weak,
        # so that a freed array's id cannot be mistaken for a later one.
        self._resident: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._text_device: Any = None

    @classmethod
    def from_bundle(cls, path: str, device: str = "auto", threads: Optional[int] = None,
                    classes: Optional[Vocabulary] = None, cache_dir: Optional[str] = None,
                    profile_dir: Optional[str] = None, **overrides: Any) -> "Segmenter":
        """``classes``: a new vocabulary (needs a bundle exported with --text-encoder).
        ``cache_dir``: TensorRT engine and timing caches (default: providers.default_cache_dir).
        ``profile_dir``: ONNX Runtime profiles of the graph sessions go there.
        ``overrides``: runtime-side settings (connectivity, prob_thd, temp_thd); None = keep."""
        bundle = read_bundle(path)
        manifest = bundle.manifest
        device = check_device_for_precision(device, manifest.precision)
        if classes is not None and manifest.text_encoder is None:
            raise UserError(f"bundle {path} has a fixed vocabulary; to choose classes at run "
                            "time re-export it with resclip-export --text-encoder")
        sessions: dict[str, ort.InferenceSession] = {}
        # Smallest graph first: 'auto' probes GPU providers on it (a failed probe still parses
        # the graph), then every other graph goes straight to the provider that bound.
        graphs = sorted(manifest.graphs, key=lambda g: manifest.files[manifest.graphs[g].file]
                        .bytes)
        layout = graph_layout(manifest.params, manifest.text_input)
        for name in graphs:
            entry = manifest.graphs[name]
            gpu = gpu_options(manifest, layout[name].inputs, manifest.files[entry.file].sha256,
                              cache_dir)
            prefix = os.path.join(profile_dir, name) if profile_dir else None
            sessions[name] = create_session(bundle.graph_file(name), device, threads, gpu,
                                            prefix)
            bundle.check_session(name, sessions[name])
            device = device_of(sessions[name])
        for name, session in sessions.items():
            log.info("%s graph on %s", name, ", ".join(session.get_providers()))
        text = None
        if manifest.text_input:
            text = load_text_bank(bundle)
        if classes is not None:
            spec = manifest.text_encoder
            # The text tower is an fp32 graph in every bundle: no fp16 engine for it.
            gpu = gpu_options(manifest, (), manifest.files[spec.graph].sha256, cache_dir)
            session = create_session(bundle.file(spec.graph), device, threads,
                                     dataclasses.replace(gpu, fp16=False))
            bundle.check_session("text_encoder", session)
            encoder = TextEncoder(Tokenizer.from_file(bundle.file(spec.tokenizer)), session, spec)
            text = encoder.bank(classes.queries)
        segmenter = cls(bundle, sessions, text, {k: v for k, v in overrides.items()
                                                 if v is not None})
        if classes is not None:
            segmenter.vocab = classes
        return segmenter

    @property
    def providers(self) -> dict[str, list[str]]:
        return {name: s.get_providers() for name, s in self.sessions.items()}

    def run_graph(self, graph: str, feeds: dict[str, Any],
                  keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run one graph with I/O binding; feeds it does not take are dropped, the text bank
        added. Outputs are numpy arrays, except those named in ``keep_on_device``, which stay
        on the GPU as OrtValues (for the next graph) when the session runs on one.

        feeds: numpy arrays or OrtValues (bound where they live, no copy).
        """
        session = self.sessions[graph]
        if self.text is not None:
            feeds = {**feeds, "text": self._text_value()}
        binding = session.io_binding()
        device = self.device_type
        for arg in session.get_inputs():
            value = feeds[arg.name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(arg.name, value)
                continue
            if arg.name != "text" and not self._is_resident(value):
                self._count(to_device=np.asarray(value).nbytes)
            binding.bind_cpu_input(arg.name, np.ascontiguousarray(value))
        names = [o.name for o in session.get_outputs()]
        for name in names:
            if name in keep_on_device and device != "cpu":
                binding.bind_output(name, device)
            else:
                binding.bind_output(name)
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        seconds = time.perf_counter() - start
        out = {name: value if name in keep_on_device and device != "cpu" else value.numpy()
               for name, value in zip(names, binding.get_outputs())}
        # What stays on a GPU is not a transfer; on a CPU session the same arrays are marked so
        # that the next graph does not count them as uploads either.
        with self._lock:
            for n in keep_on_device:
                if n in out and isinstance(out[n], np.ndarray):
                    self._resident[id(out[n])] = out[n]
        self._count(graph_s=seconds, runs=1,
                    to_host=sum(v.nbytes for n, v in out.items() if n not in keep_on_device))
        return out

    def _is_resident(self, value: Any) -> bool:
        with self._lock:
            return self._resident.get(id(value)) is value

    def _count(self, **amounts: float) -> None:
        with self._lock:     # the video engine runs graphs from two threads
            for key, amount in amounts.items():
                setattr(self.io, key, getattr(self.io, key) + amount)

    def _text_value(self) -> Any:
        """The text bank, uploaded to the GPU once (numpy on a CPU session; its bytes are
        counted once there too)."""
        if self._text_device is None:
            self._count(to_device=self.text.nbytes)
            self._text_device = self.text if self.device_type == "cpu" else \
                ort.OrtValue.ortvalue_from_numpy(self.text, self.device_type, 0)
        return self._text_device

    def forward_windows(self, windows: np.ndarray, times: Optional[Timings] = None,
                        ) -> tuple[np.ndarray, Optional[SFRStep]]:
        """(K, 3, h, w) float32 normalised windows -> (K, Q, N) patch cosine logits and the
        SFR step between the graphs (None without SFR)."""
        times = Timings() if times is None else times
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        with times("encoder"):
            enc = self.encode(windows)
        with times("sfr"):
            step = self.refine(enc, windows)
        with times("head"):
            return self.head(enc, step), step

    # The three stages of a batch of windows; the video engine runs them in separate threads.

    def encode(self, windows: np.ndarray) -> dict[str, Any]:
        """(K, 3, h, w) windows -> the first graph's outputs. On a GPU, what the head takes from
        the encoder (tokens, RCS map, window) stays there; the CPU gets the pre-pass logits
        only. Without SFR: the final ``logits``."""
        if "segmenter" in self.sessions:
            return self.run_graph("segmenter", {"pixels": windows})
        return self.run_graph("encoder", {"pixels": windows}, keep_on_device=DEVICE_RESIDENT)

    def refine(self, enc: dict[str, Any], windows: np.ndarray,
               workers: Optional[int] = None) -> Optional[SFRStep]:
        """SFR's CPU part between the graphs (None without SFR)."""
        if "segmenter" in self.sessions:
            return None
        return sfr_step(enc["prepass_logits"], windows, self.params, self.patch, workers)

    def head(self, enc: dict[str, Any], step: Optional[SFRStep]) -> np.ndarray:
        """-> (K, Q, N) patch cosine logits."""
        if step is None:
            return enc["logits"]
        return self.run_graph("head", {**enc, "sfr_bias": step.bias})["logits"]

    def run_windows(self, windows: np.ndarray, times: Optional[Timings] = None) -> np.ndarray:
        return self.forward_windows(windows, times)[0]

    def segment(self, rgb: np.ndarray, with_probs: bool = True) -> Segmentation:
        """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0); ``with_probs=False`` skips the
        (C, H0, W0) probabilities (labels only, less memory)."""
        return segment_image(rgb, self.params, self.patch, self.norm, self.vocab,
                             self.run_windows, with_probs)
