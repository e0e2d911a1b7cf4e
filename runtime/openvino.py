"""OpenVINO as a second CPU runtime for the same ONNX graphs (``--device openvino`` and
``openvino-bf16``; the ``[openvino]`` extra).

OpenVINO itself rather than ONNX Runtime's OpenVINO provider, by measurement and by install:
on this project's 2-core AVX-512 machine OpenVINO 2026.4 ran the ViT-B/16 encoder graph in 0.61x
ONNX Runtime's CPU time, the provider (onnxruntime-openvino 1.24, OpenVINO 2025.4 inside) in
0.77x; the provider would not start with BF16 on a CPU (it fell back to ONNX Runtime's CPU
provider, saying so only in a warning); and onnxruntime-openvino installs into the same folder as
onnxruntime and onnxruntime-gpu, so it cannot sit beside them. The ``openvino`` package can.

OpenVINO picks bf16 by itself on CPUs that have it. Here the precision is always set: f32 for
``openvino``, bf16 only for ``openvino-bf16`` (refused on a CPU without bf16 instructions).

A graph with int8 weights (an ``int8-weights`` bundle's encoder) runs its products with the
weights on integers at f32: OpenVINO quantizes the activations as it goes, per token in groups
of :data:`ACTIVATION_GROUP` channels (in bf16 it decompresses the weights instead). The
providers say which precision those products run at.
"""

from __future__ import annotations

import functools
import os
import queue
from typing import Any, Optional

import numpy as np

from resclip_deploy.errors import UserError

from .devices import OPENVINO_PRECISIONS

# Channels per dynamic activation scale for int8-weight graphs. ViT-B/16 encoder, 6 windows,
# this CPU: 32 (OpenVINO's default) 0.55 s, 128 0.43-0.45 s, 256 0.41-0.43 s, off 1.05 s;
# labels equal to fp32 99.65 / 99.71 / 99.67 % (ADE20K, fixture photos): 128, for the margin.
ACTIVATION_GROUP = 128
# OpenVINO element type names -> ONNX Runtime's type strings (what bundle.io_mismatch compares)
_ORT_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)",
              "i32": "tensor(int32)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


@functools.lru_cache(maxsize=1)
def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise UserError("--device openvino needs OpenVINO: pip install 'resclip-deploy[openvino]'"
                        ", or use --device cpu") from None
    return openvino


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    return _ov().Core()


def cpu_has_bf16() -> bool:
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class Port:
    """One graph input or output with the fields of ONNX Runtime's NodeArg. ``port``: of the
    model as read, whose tensor names are the ONNX graph's (compiling may add internal names)."""

    def __init__(self, port: Any):
        names = sorted(port.get_names())
        self.name = names[0] if names else port.get_any_name()
        kind = port.get_element_type().get_type_name()
        self.type = _ORT_TYPES.get(kind, f"tensor({kind})")
        self.shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


class OpenVINOSession:
    """An OpenVINO compiled model with the parts of ``ort.InferenceSession`` the runtime uses:
    ``get_inputs``, ``get_outputs``, ``get_providers`` and ``run``."""

    def __init__(self, model: str | bytes, device: str, threads: Optional[int],
                 cache_dir: Optional[str] = None):
        core = _core()
        precision = OPENVINO_PRECISIONS[device]
        if precision == "bf16" and not cpu_has_bf16():
            raise UserError("--device openvino-bf16: this CPU has no bf16 instructions "
                            "(AVX-512 BF16 or AMX); use --device openvino")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision,
                                  "PERFORMANCE_HINT": "LATENCY",
                                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": ACTIVATION_GROUP}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            config["CACHE_DIR"] = cache_dir
        try:
            graph = core.read_model(model) if isinstance(model, str) else \
                core.read_model(model, b"")
            self._compiled = core.compile_model(graph, "CPU", config)
            self.weight_products = _weight_products(self._compiled)
            self._inputs = [Port(p) for p in graph.inputs]
            self._outputs = [Port(p) for p in graph.outputs]
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"OpenVINO could not compile {_label(model)} ({first}); use "
                            "--device cpu") from None
        self.device = device
        # What the compiled model says it runs at, not what was asked for
        self.precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.precision != precision:
            raise UserError(f"OpenVINO compiled {_label(model)} at {self.precision}, not the "
                            f"{precision} asked for; use --device cpu")
        # An infer request runs one call at a time; the video engine runs graphs from two
        # threads, so requests are pooled (one more is made when all are busy).
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def get_inputs(self) -> list[Port]:
        return self._inputs

    def get_outputs(self) -> list[Port]:
        return self._outputs

    def get_providers(self) -> list[str]:
        """What runs, as the compiled model says: its precision, and its products with
        weights where they run otherwise (i8: int8 weights, activations quantized per token
        at run time; u8: a static int8 graph)."""
        other = [p for p in self.weight_products if p != self.precision]
        return [f"OpenVINO CPU {self.precision}"
                + (f" (weight products {'/'.join(self.weight_products)})" if other else "")]

    def run(self, output_names: Optional[list[str]], feeds: dict[str, np.ndarray],
            ) -> list[np.ndarray]:
        """ONNX Runtime's ``run``: outputs in graph order (or ``output_names``' order), copied
        out of the request's buffers, which its next call reuses."""
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            for i, port in enumerate(self._inputs):
                value = np.ascontiguousarray(feeds[port.name])
                if not port.shape and value.size == 1:    # ONNX Runtime takes (1,) for ()
                    value = value.reshape(())
                request.set_input_tensor(i, _ov().Tensor(value, shared_memory=True))
            request.infer()
            names = output_names or [p.name for p in self._outputs]
            index = {p.name: i for i, p in enumerate(self._outputs)}
            return [np.array(request.get_output_tensor(index[n]).data, copy=True) for n in names]
        finally:
            self._idle.put(request)


def _weight_products(compiled: Any) -> list[str]:
    """The precisions the compiled model runs its products with weights at (its
    FullyConnected layers)."""
    found = set()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "FullyConnected":
            found.add(info["runtimePrecision"].astype(str))
    return sorted(found)


def _label(model: str | bytes) -> str:
    return os.path.basename(model) if isinstance(model, str) else "a stage graph"
