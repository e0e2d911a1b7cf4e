"""Load a CLIP ViT with open_clip: a model name + pretrained tag, a local checkpoint file, or an
open_clip model folder (``hf-hub:ORG/REPO`` on the Hugging Face hub, ``local-dir:PATH`` on disk).

Local files are read without pickle code execution (``torch.load(weights_only=True)``,
safetensors, or a TorchScript archive for OpenAI's original ``.pt`` files). ``--model auto``
builds the architecture from an OpenAI-format state dict (QuickGELU, as OpenAI trained).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.factory import _find_checkpoint_in_dir
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from resclip_deploy.bundle import file_sha256
from resclip_deploy.errors import UserError

# Keys every CLIP ViT state dict has (OpenAI and open_clip naming agree for ViTs).
REQUIRED_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                 "visual.proj", "visual.ln_post.weight", "token_embedding.weight",
                 "positional_embedding", "text_projection", "ln_final.weight")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
# What a connected machine can run to get a folder that --model local-dir: reads.
_DOWNLOAD_HINT = ("on a connected machine run `hf download {repo} --include 'open_clip_*' "
                  "--local-dir DIR` (huggingface_hub < 1.0: `huggingface-cli download`), copy DIR "
                  "here and pass --model local-dir:DIR, or set HF_HUB_CACHE to a hub cache that "
                  "holds the repo")


@dataclass
class LoadedCLIP:
    """An fp32 open_clip CLIP in eval mode, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    source: dict[str, Any] = field(default_factory=dict)


def load_clip(model_name: str, pretrained: Optional[str] = None) -> LoadedCLIP:
    """``model_name``: an open_clip name (e.g. ViT-B-16-quickgelu), 'auto' (OpenAI-format file),
    ``hf-hub:ORG/REPO`` (an open_clip repo on the Hugging Face hub: open_clip_config.json +
    open_clip_model.safetensors or open_clip_pytorch_model.bin, from the local hub cache when
    huggingface.co cannot be reached) or ``local-dir:PATH`` (a folder with the same files, as
    open_clip's save_for_hf / push_to_hf_hub write them or ``hf download --local-dir`` fetches).
    ``pretrained``: for names and 'auto', an open_clip tag (e.g. openai, laion2b_s34b_b88k) or a
    checkpoint path. hf-hub: and local-dir: models carry their weights: open_clip ignores
    ``pretrained`` for them (only logging it), so giving one is refused rather than dropped.
    """
    if model_name.startswith((HF_HUB, LOCAL_DIR)):
        if pretrained is not None:
            raise UserError(f"--model {model_name} carries its own weights; drop --pretrained "
                            f"{pretrained}")
        if model_name.startswith(HF_HUB):
            return _load_hub(model_name[len(HF_HUB):])
        return _load_dir(model_name[len(LOCAL_DIR):])
    if pretrained is None:
        raise UserError("give the weights: --pretrained TAG_OR_FILE (or --model "
                        "hf-hub:ORG/REPO / local-dir:PATH)")
    if os.path.isfile(pretrained):
        return _load_file(model_name, pretrained)
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise UserError(f"checkpoint file {pretrained} does not exist")
    if model_name == "auto":
        raise UserError(f"--model auto reads the architecture from a checkpoint file, but "
                        f"--pretrained {pretrained!r} is not a file; name the model (e.g. "
                        "--model ViT-B-16) or pass a local file")
    return _load_tag(model_name, pretrained)


def load_clip_from_source(source: dict[str, Any]) -> LoadedCLIP:
    """The model a bundle manifest's ``source`` (a LoadedCLIP.source) names: the same file, tag,
    folder or hub snapshot; refused when the weights' checksum no longer matches."""
    model = source.get("model")
    if not isinstance(model, str):
        raise UserError("the bundle's manifest does not record the model it was exported from "
                        "(source.model); re-export it")
    if model.startswith(HF_HUB):
        clip = _load_hub(model[len(HF_HUB):], source.get("revision"))
    else:
        clip = load_clip(model, source.get("file") or source.get("pretrained"))
    for key in ("sha256", "weights_sha256"):
        if key in source and clip.source.get(key) != source[key]:
            raise UserError(f"the weights of {source.get('file') or model} changed since the "
                            "bundle was exported (sha256 differs); re-export it")
    return clip


def _load_dir(path: str) -> LoadedCLIP:
    folder = os.path.abspath(os.path.expanduser(path))
    name = LOCAL_DIR + folder
    if not os.path.isdir(folder):
        raise UserError(f"--model {LOCAL_DIR}{path}: no such folder; give a folder holding "
                        f"{HF_CONFIG_NAME} and the weights (an open_clip model folder)")
    config = os.path.join(folder, HF_CONFIG_NAME)
    if not os.path.isfile(config):
        raise UserError(f"{name} has no {HF_CONFIG_NAME}, so it is not an open_clip model folder "
                        "(save_for_hf writes one); for a single checkpoint file use --model NAME "
                        "--pretrained FILE")
    _check_config(config, name)
    # The very function create_model('local-dir:') picks its weights with: we hash what it loads.
    weights = _find_checkpoint_in_dir(Path(folder))
    if weights is None:
        raise UserError(f"{name} has {HF_CONFIG_NAME} but no weights next to it; put "
                        f"{HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME} there")
    model = _create(name, name)
    return LoadedCLIP(model, open_clip.get_tokenizer(name),
                      {"model": name, **_file_hashes(config, weights)})


def _load_hub(repo: str, revision: Optional[str] = None) -> LoadedCLIP:
    name = HF_HUB + repo
    with _cache_only_when_hub_unreachable():
        config = _hub_file(repo, (HF_CONFIG_NAME,), revision)
        snapshot = Path(config).parent
        # The cache keeps each commit in snapshots/<hash>/: pin the weights to the config's commit.
        commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
        _check_config(config, name)
        _hub_file(repo, (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME), commit)
        tokenizer = open_clip.get_tokenizer(name)
    weights = _find_checkpoint_in_dir(snapshot)
    model = _create(LOCAL_DIR + str(snapshot), name)
    return LoadedCLIP(model, tokenizer, {"model": name, "revision": commit,
                                         **_file_hashes(config, weights)})


def _hub_file(repo: str, filenames: tuple[str, ...], revision: Optional[str]) -> str:
    """The first of ``filenames`` the repo has, as a path in the local hub cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)
    not_cached = False
    for filename in filenames:
        try:
            return hf_hub_download(repo, filename, revision=revision)
        except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
            not_cached = True
        except EntryNotFoundError:
            pass
        except RepositoryNotFoundError:
            raise UserError(f"no repository {repo} on the Hugging Face hub (or it is private or "
                            "gated: log in with `hf auth login`)") from None
        except Exception as e:  # connection, revision and validation errors alike
            raise UserError(f"cannot get {HF_HUB}{repo} from the Hugging Face hub "
                            f"({_reason(e)}); {_DOWNLOAD_HINT.format(repo=repo)}") from None
    if not_cached:
        raise UserError(f"{HF_HUB}{repo} ({' or '.join(filenames)}) is not in the local Hugging "
                        f"Face cache ({constants.HF_HUB_CACHE}) and the hub is out of reach "
                        f"(no network, or HF_HUB_OFFLINE=1); {_DOWNLOAD_HINT.format(repo=repo)}")
    raise UserError(f"{HF_HUB}{repo} has no {' or '.join(filenames)}: not an open_clip model "
                    "repository (e.g. hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K)")


def _check_config(path: str, what: str) -> None:
    """Refuse, before building anything, the towers ResCLIP cannot use (building a Hugging Face
    text tower would even download its own weights)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)["model_cfg"]
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an open_clip model config ({type(e).__name__}: "
                        f"{_reason(e)}); open_clip's holds 'model_cfg' (embed_dim, vision_cfg, "
                        "text_cfg) and 'preprocess_cfg'") from None
    other = ("a timm image tower" if "timm_model_name" in vision else
             "a Hugging Face text tower" if "hf_model_name" in text else
             "attention pooling" if vision.get("attentional_pool") else
             f"{vision['pool_type']!r} pooling" if vision.get("pool_type", "tok") != "tok" else "")
    if other:
        raise UserError(f"{what}: {path} describes {other}; ResCLIP needs a CLIP ViT with a class "
                        "token and open_clip's own towers (e.g. "
                        "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K)")


def _create(name: str, what: str) -> torch.nn.Module:
    try:
        model = open_clip.create_model(name, weights_only=True)
    except Exception as e:  # open_clip raises many types for weights that do not fit the config
        raise UserError(f"{what}: open_clip cannot build it from its config and weights "
                        f"({_reason(e)})") from None
    return _prepare(model, what)


def _file_hashes(config: str, weights: str) -> dict[str, str]:
    return {"config_sha256": file_sha256(config), "weights_file": os.path.basename(weights),
            "weights_sha256": file_sha256(weights)}


def _reason(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


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
    reached directly (and no proxy/endpoint is configured), look in the local cache only.
    Already offline (HF_HUB_OFFLINE=1): nothing to probe."""
    import huggingface_hub.constants as hub_constants
    proxied = any(os.environ.get(v) for v in
                  ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"))
    if hub_constants.HF_HUB_OFFLINE or proxied or _reachable("huggingface.co", 443):
        yield
        return
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
    # export/model.py re-runs the blocks from nn.MultiheadAttention's in_proj/out_proj weights.
    odd = next((b for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)
                or not isinstance(b.attn, torch.nn.MultiheadAttention)), None)
    if odd is not None:
        raise UserError(f"{what}: its vision blocks are {type(odd).__name__} (qk-norm, scaled "
                        "cosine or other custom attention); ResCLIP needs open_clip's standard "
                        "ResidualAttentionBlock with nn.MultiheadAttention")
    return model.float().eval()
