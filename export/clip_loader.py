"""Load a CLIP ViT with open_clip: a model name + pretrained tag, or a local checkpoint file.

Local files are read without pickle code execution (``torch.load(weights_only=True)``,
safetensors, or a TorchScript archive for OpenAI's original ``.pt`` files). ``--model auto``
builds the architecture from an OpenAI-format state dict (QuickGELU, as OpenAI trained).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import open_clip
import torch
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import VisionTransformer

from resclip_deploy.bundle import file_sha256
from resclip_deploy.errors import UserError

# Keys every CLIP ViT state dict has (OpenAI and open_clip naming agree for ViTs).
REQUIRED_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                 "visual.proj", "visual.ln_post.weight", "token_embedding.weight",
                 "positional_embedding", "text_projection", "ln_final.weight")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass
class LoadedCLIP:
    """An fp32 open_clip CLIP in eval mode, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)


def load_clip(model_name: str, pretrained: str) -> LoadedCLIP:
    """``model_name``: an open_clip name (e.g. ViT-B-16-quickgelu) or 'auto' (OpenAI-format file).
    ``pretrained``: an open_clip tag (e.g. openai, laion2b_s34b_b88k) or a checkpoint path.
    """
    if os.path.isfile(pretrained):
        return _load_file(model_name, pretrained)
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise UserError(f"checkpoint file {pretrained} does not exist")
    if model_name == "auto":
        raise UserError(f"--model auto reads the architecture from a checkpoint file, but "
                        f"--pretrained {pretrained!r} is not a file; name the model (e.g. "
                        "--model ViT-B-16) or pass a local file")
    return _load_tag(model_name, pretrained)


def _check_model_name(model_name: str) -> None:
    if model_name not in open_clip.list_models():
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")][:8]
        raise UserError(f"unknown open_clip model {model_name!r}; e.g. {', '.join(vits)} "
                        "(or --model auto with an OpenAI-format checkpoint file)")


def _load_tag(model_name: str, tag: str) -> LoadedCLIP:
    _check_model_name(model_name)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        raise UserError(f"no pretrained tag {tag!r} for {model_name}; known tags: "
                        f"{', '.join(tags) or 'none'}; or pass a checkpoint file")
    _check_activation(model_name, tag)
    try:
        with _cache_only_when_hub_unreachable():
            model = open_clip.create_model(model_name, pretrained=tag, weights_only=True)
    except Exception as e:  # the hub raises many types; all mean "could not get the weights"
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"cannot get pretrained weights {model_name} / {tag} ({reason}). Offline? Download "
            f"the checkpoint on a connected machine and pass the file: --pretrained PATH "
            f"(with --model {model_name}, or --model auto for OpenAI-format files)") from None
    model = _prepare(model, f"{model_name}/{tag}")
    return LoadedCLIP(model, open_clip.get_tokenizer(model_name),
                      {"model": model_name, "pretrained": tag})


@contextlib.contextmanager
def _cache_only_when_hub_unreachable() -> Iterator[None]:
    """Offline, the hub client retries for ~50 s before failing; when huggingface.co cannot be
    reached directly (and no proxy/endpoint is configured), look in the local cache only."""
    proxied = any(os.environ.get(v) for v in
                  ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"))
    if proxied or _reachable("huggingface.co", 443):
        yield
        return
    import huggingface_hub.constants as hub_constants
    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _check_activation(model_name: str, tag: str) -> None:
    """open_clip only warns when a tag's activation differs from the config's (GELU vs QuickGELU,
    features off by ~2e-2); refuse instead, naming the config that fits."""
    tag_quick = bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    model_quick = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))
    if tag_quick == model_quick:
        return
    base = model_name.removesuffix("-quickgelu")
    fitting = base + "-quickgelu" if tag_quick else base
    raise UserError(f"{model_name} / {tag}: the weights were trained with "
                    f"{'QuickGELU' if tag_quick else 'GELU'} but {model_name} builds "
                    f"{'GELU' if tag_quick else 'QuickGELU'}; use --model {fitting}")


def _load_file(model_name: str, path: str) -> LoadedCLIP:
    state_dict = read_state_dict(path)
    if model_name == "auto":
        try:
            model = build_model_from_openai_state_dict(dict(state_dict))
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise UserError(f"checkpoint {path} is not a complete OpenAI-format CLIP ViT state "
                            f"dict ({type(e).__name__}: {str(e).splitlines()[0]}); with an "
                            "open_clip checkpoint, name the model with --model") from None
        context_length = int(state_dict["positional_embedding"].shape[0])
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    else:
        _check_model_name(model_name)
        model = open_clip.create_model(model_name, pretrained=None)
        _load_into(model, state_dict, path, model_name)
        tokenizer = open_clip.get_tokenizer(model_name)
    model = _prepare(model, path)
    return LoadedCLIP(model, tokenizer, {"model": model_name, "file": os.path.abspath(path),
                                         "sha256": file_sha256(path)})


def _load_into(model: torch.nn.Module, state_dict: dict, path: str, model_name: str) -> None:
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in ("input_resolution", "context_length", "vocab_size")}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", mismatched)) if keys]
    if problems:
        raise UserError(f"checkpoint {path} does not fit open_clip model {model_name}: "
                        f"{'; '.join(problems)}; pick the matching --model (or --model auto for "
                        "OpenAI-format files)")
    model.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint file -> flat state dict, without executing pickled code."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj: Any = load_file(path, device="cpu")
        elif _is_torchscript(path):
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} is not a weights file, or holds pickled Python "
                        "objects besides tensors, which are refused for safety "
                        "(torch.load weights_only=True); save a plain state dict") from None
    except Exception as e:  # torch/safetensors raise many types for a file that is not theirs
        raise UserError(f"checkpoint {path} cannot be read as a PyTorch, TorchScript or "
                        f"safetensors weights file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} does not hold a state dict of tensors")
    obj = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise UserError(f"checkpoint {path} is not a CLIP ViT state dict (missing "
                        f"{', '.join(missing[:4])}{'...' if len(missing) > 4 else ''})")
    return obj


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _prepare(model: torch.nn.Module, what: str) -> torch.nn.Module:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None \
            or visual.proj is None or getattr(visual, "pool_type", "tok") != "tok":
        raise UserError(f"{what}: ResCLIP needs a CLIP ViT with a class token and a projection "
                        "(OpenAI/LAION ViT-B/16, ViT-B/32, ViT-L/14 ...); this model is not one")
    return model.float().eval()
