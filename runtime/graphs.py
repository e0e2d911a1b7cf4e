"""Running a bundle's graphs: I/O binding, what stays on the device between graphs, and the
bytes that cross between host and device.

The segmenter's stages (runtime/segmenter.py) hand each other numpy arrays on a CPU session and
OrtValues on a GPU one; a :class:`GraphRunner` runs one graph with whatever it is given, keeps
the outputs named in ``keep_on_device`` where they are, and counts what crosses.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnxruntime as ort

from .openvino import OpenVINOSession
from .providers import ProfiledSessions, memory_of


@dataclass
class IOStats:
    """What the graph runs cost outside compute: seconds inside ONNX Runtime (and the pre-pass
    kernels), and the bytes that cross between host and device in the GPU configuration (on a
    CPU session, what would cross there: inputs and fetched outputs, not what a GPU keeps
    between graphs)."""

    graph_s: float = 0.0
    to_device: int = 0
    to_host: int = 0
    runs: int = 0


class GraphRunner:
    """A bundle's sessions (graph name -> session) and the text bank the graphs with a ``text``
    input take. One runner may serve several threads (the video engine's stages)."""

    def __init__(self, sessions: dict[str, Any], text: Optional[np.ndarray]):
        self.sessions, self.text = sessions, text
        # 'cuda' when the graphs run on a GPU provider, else 'cpu' (read once: run asks)
        self.device_type = memory_of(next(iter(sessions.values())))
        self.io = IOStats()
        # Arrays a CPU session hands from one graph to the next (a GPU keeps them), by id; weak,
        # so that a freed array's id cannot be mistaken for a later one.
        self._resident: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._text_device: Any = None

    def run(self, graph: str, feeds: dict[str, Any],
            keep_on_device: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run one graph (I/O binding on ONNX Runtime); feeds it does not take are dropped, the
        text bank added. Outputs are numpy arrays, except those named in ``keep_on_device``,
        which stay on the GPU as OrtValues (for the next graph) when the session runs on one.

        feeds: numpy arrays or OrtValues (bound where they live, no copy).
        """
        session = self.sessions[graph]
        if self.text is not None:
            feeds = {**feeds, "text": self.text_value()}
        inputs = {arg.name: feeds[arg.name] for arg in session.get_inputs()}
        if isinstance(session, ProfiledSessions):
            session = session.for_shapes({n: _shape(v) for n, v in inputs.items()})
        for name, value in inputs.items():
            if name != "text" and not isinstance(value, ort.OrtValue) \
                    and not self._is_resident(value):
                self.count(to_device=np.asarray(value).nbytes)
        if isinstance(session, OpenVINOSession):
            start = time.perf_counter()
            out = dict(zip((o.name for o in session.get_outputs()), session.run(None, inputs)))
            seconds = time.perf_counter() - start
        else:
            out, seconds = self._run_bound(session, inputs, keep_on_device)
        # What stays on a GPU is not a transfer; on a CPU session the same arrays are marked so
        # that the next graph does not count them as uploads either.
        with self._lock:
            for n in keep_on_device:
                if n in out and isinstance(out[n], np.ndarray):
                    self._resident[id(out[n])] = out[n]
        self.count(graph_s=seconds, runs=1,
                    to_host=sum(v.nbytes for n, v in out.items() if n not in keep_on_device))
        return out

    def _run_bound(self, session: ort.InferenceSession, inputs: dict[str, Any],
                   keep_on_device: tuple[str, ...]) -> tuple[dict[str, Any], float]:
        """One ONNX Runtime run with I/O binding -> outputs, seconds inside the run."""
        binding = session.io_binding()
        on_gpu = self.device_type != "cpu"
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [o.name for o in session.get_outputs()]
        for name in names:
            if name in keep_on_device and on_gpu:
                binding.bind_output(name, self.device_type)
            else:
                binding.bind_output(name)
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        seconds = time.perf_counter() - start
        return {name: value if name in keep_on_device and on_gpu else value.numpy()
                for name, value in zip(names, binding.get_outputs())}, seconds

    def _is_resident(self, value: Any) -> bool:
        with self._lock:
            return self._resident.get(id(value)) is value

    def count(self, **amounts: float) -> None:
        with self._lock:     # the video engine runs graphs from two threads
            for key, amount in amounts.items():
                setattr(self.io, key, getattr(self.io, key) + amount)

    def text_value(self) -> Any:
        """The text bank, uploaded to the GPU once (numpy on a CPU session; its bytes are
        counted once there too)."""
        if self._text_device is None:
            self._text_device = self.upload_once(self.text)
        return self._text_device

    def upload_once(self, array: np.ndarray) -> Any:
        """An input many runs share, uploaded once: an OrtValue on a GPU; on a CPU session the
        array itself, counted once and then resident (not counted as an upload again)."""
        self.count(to_device=array.nbytes)
        if self.device_type == "cpu":
            with self._lock:
                self._resident[id(array)] = array
            return array
        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, 0)

    def host(self, value: Any) -> np.ndarray:
        """A stage's tensor on the host: numpy as is, a GPU OrtValue copied down (counted)."""
        if not isinstance(value, ort.OrtValue):
            return value
        array = value.numpy()
        self.count(to_host=array.nbytes)
        return array


def _shape(value: Any) -> tuple[int, ...]:
    """A feed's shape: numpy's attribute, an OrtValue's method."""
    return tuple(value.shape() if isinstance(value, ort.OrtValue) else np.shape(value))
