"""Reading images and writing results: clear errors, atomic writes (temporary name, then rename)."""

from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from typing import Callable, Iterable

import cv2
import numpy as np

from .errors import UserError
from .postprocess import Segmentation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path: str) -> np.ndarray:
    """Image file -> RGB uint8 (H, W, 3).

    OpenCV's IMREAD_COLOR, as the reference: EXIF orientation applied, grayscale expanded,
    alpha dropped, 16-bit scaled to 8-bit.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except OSError as e:
        raise UserError(f"image {path} cannot be read: {e.strerror or e}") from None
    return decode_image(data, f"image {path}")


def decode_image(data: np.ndarray | bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3), as :func:`read_image`; ``name`` for errors."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    bgr = quiet_imdecode(data) if data.size else None
    if bgr is None:
        raise UserError(f"{name} is empty, corrupt or not an image format OpenCV reads "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def quiet_imdecode(data: np.ndarray, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """imdecode without OpenCV's own stderr lines for broken files (we report them by name)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(data, flags)
    finally:
        cv2.utils.logging.setLogLevel(level)


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> file paths.

    A name that is neither an existing path nor a matching pattern is kept, so reading it
    reports it by name.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(item, f)))
            if not found:
                raise UserError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif not os.path.exists(item) and glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise UserError(f"pattern {item} matches no file")
            files.extend(found)
        else:
            files.append(item)
    return list(dict.fromkeys(files))   # a file named twice (e.g. also via its folder) runs once


def output_stems(files: list[str]) -> list[str]:
    """One output name per input: its stem; two inputs with one stem are an error."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    seen: dict[str, str] = {}
    for stem, f in zip(stems, files):
        if stem in seen and seen[stem] != f:
            raise UserError(f"inputs {seen[stem]} and {f} would both write {stem}.png; "
                            "rename one or run them into different output folders")
        seen[stem] = f
    return stems


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())     # mkstemp makes 0600; results are plain files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def label_dtype(num_classes: int) -> type:
    """Stored label maps: 8-bit up to 256 classes, else 16-bit."""
    return np.uint8 if num_classes <= 256 else np.uint16


def label_png_bytes(labels: np.ndarray, num_classes: int) -> bytes:
    """(H, W) class indices -> PNG bytes (:func:`label_dtype`)."""
    ok, buf = cv2.imencode(".png", labels.astype(label_dtype(num_classes)))
    assert ok, "PNG encoding of a label map cannot fail"
    return buf.tobytes()


def write_segmentation(outdir: str, stem: str, seg: Segmentation, save_probs: bool) -> list[str]:
    """<stem>.png label map and, with ``save_probs``, <stem>.npz (labels, probs). Returns paths."""
    os.makedirs(outdir, exist_ok=True)
    png = os.path.join(outdir, f"{stem}.png")
    data = label_png_bytes(seg.labels, len(seg.class_names))
    atomic_write(png, lambda f: f.write(data))
    written = [png]
    if save_probs:
        assert seg.probs is not None, "probabilities were not computed"
        npz = os.path.join(outdir, f"{stem}.npz")
        atomic_write(npz, lambda f: np.savez_compressed(
            f, labels=seg.labels, probs=seg.probs.astype(np.float32),
            class_names=np.array(seg.class_names)))
        written.append(npz)
    return written


def write_overlay(outdir: str, stem: str, rgb: np.ndarray, seg: Segmentation) -> str:
    """<stem>_overlay.jpg: the photo blended with class colours, plus a legend of the classes
    present. Returns its path."""
    path = os.path.join(outdir, f"{stem}_overlay.jpg")
    data = overlay_jpeg_bytes(rgb, seg)
    atomic_write(path, lambda f: f.write(data))
    return path


def overlay_jpeg_bytes(rgb: np.ndarray, seg: Segmentation) -> bytes:
    """The overlay (photo, class colours, legend) as JPEG bytes."""
    from .overlay import overlay
    image = cv2.cvtColor(overlay(rgb, seg.labels, seg.class_names), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok, "JPEG encoding of an overlay cannot fail"
    return buf.tobytes()


def image_summary(path: str, written: list[str], seg: Segmentation,
                  seconds: float) -> dict:
    """One image's entry of summary.json."""
    from .overlay import class_fractions
    fractions = class_fractions(seg.labels, len(seg.class_names))
    return {"input": path, "outputs": written, "size": list(seg.labels.shape),
            "seconds": round(seconds, 4),
            "stages": {k: round(v, 4) for k, v in seg.timings.items()},
            "classes": {seg.class_names[c]: round(f, 6) for c, f in
                        sorted(fractions.items(), key=lambda kv: -kv[1])}}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(data, indent=1, default=str).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
