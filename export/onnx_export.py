"""Thin wrappers that turn :class:`ResCLIPVisual` steps into ONNX graphs, and their export.

The graphs and their I/O names come from :func:`resclip_deploy.bundle.graph_layout`. The text
bank is a constant of the graphs (default) or their ``text`` input. Batch, height and width are
dynamic, so one bundle takes any number of windows of any size.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from resclip_deploy.bundle import OPSET, GraphIO

from .model import ResCLIPVisual

# Protobuf caps one file at 2 GB: bigger graphs (ViT-H and up) keep their weights in a .data file.
EXTERNAL_DATA_BYTES = 1_500_000_000


class GraphModule(nn.Module):
    """Positional inputs named by ``io.inputs``; returns the tensors named by ``io.outputs``."""

    def __init__(self, net: ResCLIPVisual, io: GraphIO, text: Optional[torch.Tensor]):
        super().__init__()
        self.net, self.io = net, io
        if text is not None:
            self.register_buffer("text_const", text)

    def _text(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return named["text"] if "text" in named else self.text_const

    def _select(self, produced: dict[str, Optional[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        return tuple(produced[name] for name in self.io.outputs)


class EncoderGraph(GraphModule):
    """pixels -> trunk tokens, RCS map, naclip window, SFR pre-pass logits (head without S)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.io.inputs, inputs))
        pixels = named["pixels"]
        tokens, rcs = self.net.encode(pixels)
        window = self.net.window(pixels)
        prepass = self.net.head(tokens, rcs, window, None, self._text(named))
        # fp32 at the graph boundary whatever the weights (fp16 tokens round-trip exactly).
        return self._select({"tokens": tokens.float(), "rcs": rcs, "window": window,
                             "prepass_logits": prepass})


class HeadGraph(GraphModule):
    """tokens, RCS map, window, SFR bias -> patch cosine logits."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.io.inputs, inputs))
        logits = self.net.head(named["tokens"], named.get("rcs"), named.get("window"),
                               named["sfr_bias"], self._text(named))
        return self._select({"logits": logits})


class SegmenterGraph(GraphModule):
    """pixels -> patch cosine logits (no SFR: nothing runs between the network halves)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.io.inputs, inputs))
        pixels = named["pixels"]
        tokens, rcs = self.net.encode(pixels)
        logits = self.net.head(tokens, rcs, self.net.window(pixels), None, self._text(named))
        return self._select({"logits": logits})


GRAPH_MODULES = {"encoder": EncoderGraph, "head": HeadGraph, "segmenter": SegmenterGraph}


def example_inputs(net: ResCLIPVisual, io: GraphIO, text: torch.Tensor, hw: tuple[int, int],
                   ) -> tuple[torch.Tensor, ...]:
    """Batch-2 example inputs (a batch of 1 would be specialised by the exporter)."""
    visual = net.visual
    b, (h, w) = 2, hw
    t = 1 + (h // net.patch) * (w // net.patch)
    width = visual.conv1.out_channels
    heads = visual.transformer.resblocks[0].attn.num_heads
    g = torch.Generator().manual_seed(0)
    shapes = {"pixels": (b, 3, h, w), "tokens": (b, t, width), "rcs": (b, heads, t, t),
              "window": (t, t), "sfr_bias": (b, t, t)}
    made = {name: torch.rand(shape, generator=g) for name, shape in shapes.items()}
    made["text"] = text
    return tuple(made[name] for name in io.inputs)


def dynamic_shapes(io: GraphIO) -> tuple[dict[int, torch.export.Dim], ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=16, max=8192)
    width = torch.export.Dim("width", min=16, max=8192)
    tokens = torch.export.Dim("tokens", min=2, max=200000)
    queries = torch.export.Dim("queries", min=1, max=100000)
    dims = {"pixels": {0: batch, 2: height, 3: width}, "tokens": {0: batch, 1: tokens},
            "rcs": {0: batch, 2: tokens, 3: tokens}, "window": {0: tokens, 1: tokens},
            "sfr_bias": {0: batch, 1: tokens, 2: tokens}, "text": {0: queries}}
    return tuple(dims[name] for name in io.inputs)


def export_graph(module: GraphModule, inputs: tuple[torch.Tensor, ...], path: str) -> None:
    """Trace ``module`` with the dynamo exporter into a single-file ONNX graph at ``path``.

    ``forward(*inputs)`` is one variadic argument, so its dynamic shapes nest in a 1-tuple.
    """
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, inputs, dynamo=True, opset_version=OPSET,
            input_names=list(module.io.inputs), output_names=list(module.io.outputs),
            dynamic_shapes=(dynamic_shapes(module.io),), optimize=True, verbose=False)
    weights = sum(t.numel() * t.element_size() for t in
                  [*module.parameters(), *module.buffers()])
    program.save(path, external_data=weights > EXTERNAL_DATA_BYTES)
