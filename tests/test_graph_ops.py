"""Every graph the runtime builds runs as it is on a GPU provider: each (op, input element types)
pair has a kernel in ONNX Runtime's CUDA execution provider, every Conv names its kernel size
(TensorRT 10.1's parser reads it only from ``kernel_shape``), and uint8 is cast only from and to
float types (TensorRT converts uint8 to and from nothing else).

The graphs: the bundle graphs (encoder, head, segmenter, text tower; fp32 and fp16), every stage
graph (stage_graphs.stage_model: both connectivities, slide and whole, fp16 pre-pass, output with
and without probabilities and threshold, uint8 and int32 labels) and the fused chains. Element
types come from ONNX shape inference; '-' is an empty optional input.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Optional

import onnx
import pytest
from onnx import TensorProto, helper

from resclip_deploy import geometry, stage_graphs, stages
from resclip_deploy.params import CONNECTIVITIES, MODES, ResCLIPParams

# The allow-list: ONNX Runtime's kernel table, docs/OperatorKernels.md, section "Operators
# implemented by CUDAExecutionProvider", microsoft/onnxruntime at commit 001d12d2623f (main; it
# lists opset-25 kernels, so ONNX Runtime >= 1.23), the row of each op that covers opset 18.
# op -> (its inputs as the table names them: a type constraint, or a type for a fixed-type
# input; a trailing '...' repeats the last), {constraint: types the table lists}). A constraint
# the row lists no types for (Pad's axes, Resize's roi) admits only an empty input.
ALL = frozenset({"bfloat16", "bool", "double", "float", "float16", "int16", "int32", "int64",
                 "int8", "uint16", "uint32", "uint64", "uint8"})
ARITHMETIC = ALL - {"bool"}                  # Add, Sub, Mul, Div, Abs: 14+ / 13+ rows
FLOATS = frozenset({"double", "float", "float16"})
FLOATS_BF16 = FLOATS | {"bfloat16"}
COMPARE = FLOATS | {"int32", "int64", "uint32", "uint64"}   # Greater, Less, LessOrEqual
MINMAX = FLOATS_BF16 | {"int32", "int64", "uint32", "uint64"}
CUDA_KERNELS: dict[str, tuple[tuple[str, ...], dict[str, frozenset]]] = {
    "Abs": (("T",), {"T": ARITHMETIC}),
    "Add": (("T", "T"), {"T": ARITHMETIC}),
    "And": (("T", "T"), {"T": frozenset({"bool"})}),
    "ArgMax": (("T",), {"T": FLOATS}),
    "Cast": (("T1",), {"T1": ALL}),                                       # [13, 18]
    "Clip": (("T", "T", "T"), {"T": FLOATS | {"int64", "int8", "uint64", "uint8"}}),
    "Concat": (("T...",), {"T": ALL}),
    "Conv": (("T", "T", "T"), {"T": FLOATS}),                             # [11, 21]
    "Div": (("T", "T"), {"T": ARITHMETIC}),
    "Einsum": (("T...",), {"T": FLOATS}),
    "Equal": (("T", "T"), {"T": FLOATS | {"bool", "int32", "int64", "uint32", "uint64"}}),
    "Erf": (("T",), {"T": FLOATS_BF16}),
    "Exp": (("T",), {"T": FLOATS_BF16}),
    "Expand": (("T", "int64"), {"T": ALL}),
    "Floor": (("T",), {"T": FLOATS}),
    "Gather": (("T", "Tind"), {"T": ALL, "Tind": frozenset({"int32", "int64"})}),
    "GatherND": (("T", "int64"), {"T": FLOATS_BF16 | {"bool", "int64"}}),
    "Gemm": (("T", "T", "T"), {"T": FLOATS_BF16}),
    "Greater": (("T", "T"), {"T": COMPARE}),
    "Identity": (("V",), {"V": ALL}),                                     # [14, 18]
    "LayerNormalization": (("T", "T", "T"), {"T": FLOATS_BF16}),          # 17+
    "Less": (("T", "T"), {"T": COMPARE}),
    "LessOrEqual": (("T", "T"), {"T": COMPARE}),
    "MatMul": (("T", "T"), {"T": FLOATS_BF16}),
    "Max": (("T...",), {"T": MINMAX}),
    "Min": (("T...",), {"T": MINMAX}),
    "Mod": (("T", "T"), {"T": MINMAX}),
    "Mul": (("T", "T"), {"T": ARITHMETIC}),
    "Neg": (("T",), {"T": FLOATS_BF16 | {"int16", "int32", "int64", "int8"}}),
    "Or": (("T", "T"), {"T": frozenset({"bool"})}),
    "Pad": (("T", "int64", "T", "Tind"), {"T": FLOATS | {"bool"}, "Tind": frozenset()}),  # 18+
    "Pow": (("T", "T1"), {"T": FLOATS_BF16 | {"int32", "int64"},
                          "T1": FLOATS_BF16 | {"int32", "int64"}}),
    "Range": (("T", "T", "T"), {"T": frozenset({"double", "float", "int16", "int32", "int64"})}),
    "ReduceL2": (("T", "int64"), {"T": FLOATS | {"int32"}}),
    "ReduceMax": (("T", "int64"), {"T": FLOATS | {"int32", "int64"}}),
    "ReduceMin": (("T", "int64"), {"T": FLOATS | {"int32", "int64", "int8", "uint8"}}),
    "ReduceSum": (("T", "int64"), {"T": FLOATS_BF16 | {"int32", "int64"}}),
    "Relu": (("T",), {"T": FLOATS_BF16}),
    "Reshape": (("T", "int64"), {"T": ALL}),                              # [14, 18]
    "Resize": (("T1", "T2", "float", "int64"),                            # 18
               {"T1": FLOATS | {"int32", "uint8"}, "T2": frozenset()}),
    "Round": (("T",), {"T": FLOATS}),
    "Shape": (("T",), {"T": ALL}),                                        # [15, 18]
    "Sigmoid": (("T",), {"T": FLOATS_BF16}),
    "Slice": (("T", "Tind", "Tind", "Tind", "Tind"),
              {"T": ALL, "Tind": frozenset({"int32", "int64"})}),
    "Softmax": (("T",), {"T": FLOATS_BF16}),
    "Split": (("T", "int64"), {"T": ALL}),
    "Sqrt": (("T",), {"T": FLOATS_BF16}),
    "Squeeze": (("T", "int64"), {"T": ALL}),                              # [13, 20]
    "Sub": (("T", "T"), {"T": ARITHMETIC}),
    "Transpose": (("T",), {"T": ALL}),                                    # [13, 20]
    "Unsqueeze": (("T", "int64"), {"T": ALL}),                            # [13, 20]
    "Where": (("B", "T", "T"), {"B": frozenset({"bool"}),
                                "T": FLOATS_BF16 | {"int32", "int64", "uint8"}}),
}
# The rows above are those of opset 18: a graph of another opset needs the table read again.
TABLE_OPSET = 18
# TensorRT's DataType.UINT8 (Python API docs): "uint8 conversions are only supported for
# {float32, float16}".
UINT8_PARTNERS = frozenset({"float", "float16"})


def kernel_gap(op: str, types: tuple[str, ...]) -> Optional[str]:
    """Why the declared CUDA table has no kernel for ``op`` with these input element types
    ('-': an empty optional input), or None when it has one."""
    if op not in CUDA_KERNELS:
        return f"{op} is not in the declared CUDA kernel table"
    params, allowed = CUDA_KERNELS[op]
    if params[-1].endswith("..."):
        params = params[:-1] + (params[-1][:-3],) * max(1, len(types) - len(params) + 1)
    if len(types) > len(params):
        return f"{op} takes at most {len(params)} inputs, not {len(types)}"
    bound: dict[str, str] = {}
    for param, t in zip(params, types):
        if t == "-":
            continue
        ok = allowed.get(param, frozenset({param}))
        if t not in ok:
            return f"{op} input {param} is {t}; the CUDA kernels take {sorted(ok) or 'none'}"
        if bound.setdefault(param, t) != t:
            return f"{op} inputs of constraint {param} differ: {bound[param]} and {t}"
    return None


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def element_types(model: onnx.ModelProto) -> dict[str, str]:
    """Every value's element type by ONNX shape inference ('' names an empty input: '-')."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    types = {v.name: type_name(v.type.tensor_type.elem_type)
             for v in [*g.input, *g.value_info, *g.output]
             if v.type.tensor_type.elem_type}
    types.update({t.name: type_name(t.data_type) for t in g.initializer})
    types[""] = "-"
    return types


def node_pairs(model: onnx.ModelProto) -> list[tuple[str, tuple[str, ...]]]:
    """(op type, input element types) of every node; an input of unknown type fails."""
    types = element_types(model)
    pairs = []
    for node in model.graph.node:
        missing = [i for i in node.input if i not in types]
        assert not missing, f"{node.op_type} {node.name}: no element type for {missing}"
        pairs.append((node.op_type, tuple(types[i] for i in node.input)))
    return pairs


def convs_without_kernel_shape(model: onnx.ModelProto) -> list[str]:
    return [n.name or n.output[0] for n in model.graph.node if n.op_type == "Conv"
            and "kernel_shape" not in {a.name for a in n.attribute}]


def uint8_casts_with_other_types(model: onnx.ModelProto) -> list[str]:
    """Casts to uint8 from, or from uint8 to, anything but float32/float16."""
    types = element_types(model)
    bad = []
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        source = types[n.input[0]]
        target = type_name(helper.get_attribute_value(
            next(a for a in n.attribute if a.name == "to")))
        if "uint8" in (source, target) and not {source, target} - {"uint8"} <= UINT8_PARTNERS:
            bad.append(f"{n.output[0]}: {source} -> {target}")
    return bad


def opset_problems(model: onnx.ModelProto) -> list[str]:
    return [f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import
            if o.domain not in ("", "ai.onnx") or o.version != TABLE_OPSET]


# --- the checkers themselves -----------------------------------------------------------------


def test_kernel_gap_follows_the_table():
    assert kernel_gap("Where", ("bool", "float", "float")) is None
    assert kernel_gap("Concat", ("int64",) * 6) is None
    assert kernel_gap("Resize", ("float", "-", "-", "int64")) is None
    # what the CUDA table lacks, though the CPU table has some of them
    assert "int64" in kernel_gap("ArgMax", ("int64",))
    assert "int64" in kernel_gap("Pad", ("int64", "int64"))
    assert kernel_gap("Resize", ("float", "float", "-", "int64"))              # roi given
    assert kernel_gap("Pad", ("float", "int64", "float", "int64"))              # axes given
    assert "differ" in kernel_gap("Where", ("bool", "float", "int64"))
    assert "not in the declared" in kernel_gap("NonMaxSuppression", ("float", "float"))
    assert kernel_gap("Add", ("float",) * 3)


def tiny_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TABLE_OPSET)])


def test_checkers_find_a_conv_without_kernel_shape_and_an_int64_to_uint8_cast():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8])
    conv = tiny_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1])], [x, w], [y])
    assert convs_without_kernel_shape(conv) == ["y"]
    conv.graph.node[0].attribute.append(helper.make_attribute("kernel_shape", [3]))
    assert convs_without_kernel_shape(conv) == []
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [4])
    u = helper.make_tensor_value_info("u", TensorProto.UINT8, [4])
    cast = tiny_model([helper.make_node("Cast", ["i"], ["u"], to=TensorProto.UINT8)], [i], [u])
    assert uint8_casts_with_other_types(cast) == ["u: int64 -> uint8"]
    assert node_pairs(cast) == [("Cast", ("int64",))]


# --- every graph the runtime builds ------------------------------------------------------------

SYNONYMS = [0, 0, 1, 2, 2, 3]          # query -> class, with synonyms
LABELS_VARIANTS = {"uint8": list(range(4)), "synonyms": SYNONYMS,
                   "int32": list(range(300))}     # more classes than uint8 holds


def stage_graph_set() -> dict[str, onnx.ModelProto]:
    """Every stage graph for both modes and connectivities, the fp16 pre-pass and the output's
    variants; the same graph under two names is kept once."""
    graphs, seen = {}, set()
    for mode in MODES:
        for connectivity in CONNECTIVITIES:
            for prob_thd in (0.0, 0.1):
                params = ResCLIPParams(mode=mode, connectivity=connectivity, prob_thd=prob_thd)
                for stage in stages.STAGES:
                    if stages.GRAPH not in stage.implementations:
                        continue
                    for fp16 in (False, True):
                        for probs in (False, True):
                            for labels, q2c in LABELS_VARIANTS.items():
                                model = stage_graphs.stage_model(
                                    stage.name, params, 16, q2c, geometry.CLIP_PIXEL_NORM,
                                    fp16=fp16, probs=probs)
                                key = hashlib.sha256(model.SerializeToString()).hexdigest()
                                if key not in seen:
                                    seen.add(key)
                                    graphs[f"{stage.name}[{mode},{connectivity},thd={prob_thd},"
                                           f"fp16={fp16},probs={probs},{labels}]"] = model
    return graphs


# (name, precision, SFR, text encoder): fp32 and fp16 with SFR (encoder, head, fused chains);
# fp32 without SFR with a text tower (segmenter taking the text bank, text encoder); fp16
# without SFR (segmenter, fused chain)
BUNDLES = [("fp32-sfr", "fp32", True, False), ("fp16-sfr", "fp16", True, False),
           ("fp32-plain-text", "fp32", False, True), ("fp16-plain", "fp16", False, False)]


@pytest.fixture(scope="module")
def bundle_graphs(tiny_files, tmp_path_factory):
    """The bundle graphs and fused chains of the tiny model's bundles (4 exports)."""
    from conftest import TINY
    from resclip_deploy.bundle import read_bundle
    from resclip_deploy.export.bundle_export import export_bundle
    from resclip_deploy.export.clip_loader import load_clip
    from resclip_deploy.params import CUSTOM
    from resclip_deploy.runtime.fused import fused_model
    from resclip_deploy.vocab import parse_class_list
    clip = load_clip(TINY, str(tiny_files[1]["pt"]))
    root = tmp_path_factory.mktemp("graph_ops")
    graphs = {}
    for name, precision, sfr, text in BUNDLES:
        out = str(root / name)
        export_bundle(clip, parse_class_list("cat|kitten,sofa"), CUSTOM.replace(sfr=sfr), out,
                      precision=precision, text_encoder=text)
        bundle = read_bundle(out)
        for graph in bundle.manifest.graphs:
            graphs[f"{graph}[{name}]"] = onnx.load(bundle.graph_file(graph))
        if bundle.manifest.text_encoder is not None:
            graphs[f"text_encoder[{name}]"] = onnx.load(
                bundle.file(bundle.manifest.text_encoder.graph))
        if not text:
            for connectivity in CONNECTIVITIES if sfr else (None,):
                graphs[f"fused[{name},{connectivity}]"] = fused_model(out, connectivity)
    return graphs


@pytest.mark.slow
def test_every_graph_runs_as_it_is_on_gpu_providers(bundle_graphs, record_property):
    graphs = {**bundle_graphs, **stage_graph_set()}
    expected = {"encoder", "head", "segmenter", "text_encoder", "fused"} | {
        s.name for s in stages.STAGES if stages.GRAPH in s.implementations}
    assert {name.split("[")[0] for name in graphs} == expected
    inventory: dict[tuple[str, tuple[str, ...]], collections.Counter] = collections.defaultdict(
        collections.Counter)
    problems = []
    for name, model in graphs.items():
        problems += [f"{name}: opset {o}" for o in opset_problems(model)]
        problems += [f"{name}: Conv {c} has no kernel_shape"
                     for c in convs_without_kernel_shape(model)]
        problems += [f"{name}: uint8 cast {c}" for c in uint8_casts_with_other_types(model)]
        for pair in node_pairs(model):
            inventory[pair][name] += 1
    for (op, types), where in sorted(inventory.items()):
        gap = kernel_gap(op, types)
        if gap:
            problems.append(f"{gap} (in {', '.join(sorted(where))})")
    nodes = sum(sum(c.values()) for c in inventory.values())
    summary = (f"{len(graphs)} graphs, {nodes} nodes, {len(inventory)} (op, input types) pairs, "
               f"{len({op for op, _ in inventory})} ops")
    record_property("graph_op_inventory", summary)
    print(summary)
    for (op, types), where in sorted(inventory.items()):
        print(f"  {op}({', '.join(types)}): {sum(where.values())} nodes in {len(where)} graphs")
    assert not problems, "\n".join(problems)
