"""The floor of resclip-bench: a plain ViT image tower of a bundle's size (open_clip's
VisionTransformer, random weights: its cost does not depend on them), exported to ONNX at one
window size and batch, so that the runtime's time per image can be read against what the
transformer alone costs on the same windows in ONNX Runtime. Run in a subprocess (torch).
Prints one JSON line."""

from __future__ import annotations

import json
import sys
import warnings

import onnx
import torch

from resclip_deploy.bundle import OPSET, read_bundle



def mlp_width(encoder_onnx: str, width: int) -> int:
    """The MLP width of the bundle's blocks, read from its encoder graph's first MLP bias (4x
    width, ViT-B/L/H's ratio, when there is none by that name)."""
    model = onnx.load(encoder_onnx, load_external_data=False)
    for init in model.graph.initializer:
        if init.name.endswith("mlp.c_fc.bias") and len(init.dims) == 1:
            return int(init.dims[0])
    return 4 * width


def plain_tower(bundle_dir: str, hw: tuple[int, int]) -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest.model
    first = "encoder" if "encoder" in bundle.manifest.graphs else "segmenter"
    ratio = mlp_width(bundle.graph_file(first), m.width) / m.width
    torch.manual_seed(0)
    return VisionTransformer(image_size=hw, patch_size=m.patch, width=m.width, layers=m.depth,
                             heads=m.heads, mlp_ratio=ratio, output_dim=m.embed_dim).eval()


def main(argv: list[str]) -> None:
    args = json.loads(argv[0])
    hw = tuple(args["hw"])
    tower = plain_tower(args["bundle"], hw)
    pixels = torch.zeros((args["batch"], 3, *hw))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(tower, (pixels,), dynamo=True, opset_version=OPSET,
                                    input_names=["pixels"], output_names=["embedding"],
                                    optimize=True, verbose=False)
    program.save(args["out"])
    print(json.dumps({"out": args["out"], "mlp_ratio": tower.transformer.resblocks[0]
                      .mlp.c_fc.out_features / tower.transformer.width}))


if __name__ == "__main__":
    main(sys.argv[1:])
