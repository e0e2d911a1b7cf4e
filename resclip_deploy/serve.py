"""``resclip-serve BUNDLE``: the segmenter as an HTTP service (FastAPI, run by uvicorn in one
process; the ``[serve]`` extra).

    POST /v1/segment        an image (multipart field ``image`` or the raw body) -> labels
                            ?format=png|rle|json  &overlay=true  &classes=cat,sofa|couch
    GET  /healthz /readyz /v1/info /metrics
    GET  /                  a page for people (resclip_deploy/static): pick an image, see the
                            overlay and its legend; it calls the API like any client

What protects the process: request bytes are counted while they arrive (413 beyond the limit);
an image's size is read from its header before it is decoded (413 beyond the pixel limit, so
a 50000x50000 PNG never reaches the decoder); at most ``max_in_flight`` images are admitted, the
next gets 503 with Retry-After; graph work runs on a thread pool off the event loop, and a
request that takes longer than ``timeout_s`` gets 504 (its work still finishes and holds its
slot until then). Every bad request is a 4xx JSON ``{"error": ...}`` naming the problem.
"""


import asyncio
import base64
import collections
import contextlib
import functools
import hmac
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import numpy as np

from .bundle import public_source
from .errors import UserError, cpus, needs_extra
from .io import decode_image, label_png_bytes, overlay_jpeg_bytes
from .overlay import class_fractions, palette
from .postprocess import Segmentation
from .vocab import Vocabulary, parse_class_list

FORMATS = ("png", "rle", "json")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The page's files (resclip_deploy/static) -> media type; index.html is served at /.
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# The page runs nothing but its own files and talks to nothing but this API: no inline script,
# no other origin (an offline deployment has none anyway), no framing (it may hold a token);
# data: images because the API returns the overlay as base64.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                                           "style-src 'self'; img-src 'self' data:; "
                                           "connect-src 'self'; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
                # the page and its script must come from the same (possibly upgraded) server
                "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access. ``token``: the bearer token every /v1 and /metrics request must carry
    (None: no token); ``cors_origins``: origins allowed to call from a browser (none: CORS off)."""

    max_request_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    max_in_flight: int = 4
    workers: int = 1
    timeout_s: float = 60.0
    max_classes: int = 256
    vocabularies_cached: int = 8
    token: Optional[str] = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)


class RequestError(Exception):
    """A bad request: its status and the one-line message the client gets."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a binary (H, W) mask: run lengths in column-major order,
    starting with a run of zeros (0 when the first pixel is set)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    return ([0] if flat.size and flat[0] else []) + runs.tolist()


def rle(mask: np.ndarray) -> dict[str, Any]:
    """One class's mask as COCO RLE: compressed (pycocotools' string) when pycocotools is
    installed, else uncompressed counts."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        return {"size": list(mask.shape), "counts": rle_counts(mask)}
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode("ascii")}


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) from the image's header, refused beyond ``max_pixels`` before any
    pixel is decoded (Pillow reads only the header until asked for more). A JPEG is then read
    through at 1/8 scale (its DCT scaling; cheap), because OpenCV fills a truncated one with
    grey and says so only on stderr."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise RequestError(400, f"the image is {width}x{height}; it needs pixels")
            if width * height > max_pixels:
                raise RequestError(413, f"the image is {width}x{height} = {width * height} "
                                        f"pixels, more than this service's {max_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except Image.DecompressionBombError:     # beyond twice Pillow's own MAX_IMAGE_PIXELS
        raise RequestError(413, "the image's header declares more pixels than this service "
                                "decodes") from None
    except UnidentifiedImageError:
        raise RequestError(415, "the body is not an image this service reads (JPEG, PNG, "
                                "WebP, BMP, TIFF)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"the image is corrupt or truncated ({e})") from None
    return height, width


class Service:
    """What the app serves: the segmenter, per-vocabulary segmenters (cached, least recently
    used dropped), the admission counter and the metrics."""

    def __init__(self, segmenter: Any, settings: ServeSettings):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.segmenter, self.settings = segmenter, settings
        self.pool = ThreadPoolExecutor(max_workers=settings.workers,
                                       thread_name_prefix="resclip-serve")
        self._vocabularies: collections.OrderedDict = collections.OrderedDict()
        self._vocab_lock = threading.Lock()
        self.in_flight = 0
        self.ready = False
        self.registry = CollectorRegistry()
        self.requests = Counter("resclip_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("resclip_errors", "Refused or failed requests by reason",
                              ["reason"], registry=self.registry)
        self.latency = Histogram("resclip_request_seconds", "Request latency",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
        self.gauge = Gauge("resclip_in_flight", "Images admitted and not yet answered",
                           registry=self.registry)

    def info(self) -> dict[str, Any]:
        seg = self.segmenter
        m = seg.bundle.manifest
        return {"model": public_source(m.source), "vocabulary": m.vocabulary.to_dict(),
                "classes": list(seg.vocab.class_names), "precision": m.precision,
                "settings": seg.params.to_dict(), "runtime_classes": m.text_encoder is not None,
                "providers": seg.providers, "stages": seg.plan,
                "process": {"pid": os.getpid(), "host": socket.gethostname()},
                "limits": {"max_request_bytes": self.settings.max_request_bytes,
                           "max_pixels": self.settings.max_pixels,
                           "max_in_flight": self.settings.max_in_flight,
                           "timeout_s": self.settings.timeout_s,
                           "max_classes": self.settings.max_classes}}

    def admit(self) -> bool:
        """One more image in flight, unless the limit is reached (event loop thread only)."""
        if self.in_flight >= self.settings.max_in_flight:
            return False
        self.in_flight += 1
        self.gauge.inc()
        return True

    def release(self, _: Any = None) -> None:
        self.in_flight -= 1
        self.gauge.dec()

    def for_classes(self, spec: Optional[str]) -> Any:
        """The segmenter for a request's ``classes`` (None: the bundle's vocabulary)."""
        if spec is None:
            return self.segmenter
        if self.segmenter.bundle.manifest.text_encoder is None:
            raise RequestError(400, "classes: this bundle has a fixed vocabulary (it was "
                                    "exported without --text-encoder); leave classes out")
        try:
            vocab: Vocabulary = parse_class_list(spec)
        except UserError as e:
            raise RequestError(400, f"classes: {e}") from None
        if len(vocab.class_names) > self.settings.max_classes:
            raise RequestError(400, f"classes: {len(vocab.class_names)} classes, more than "
                                    f"this service's {self.settings.max_classes}")
        key = (vocab.class_names, vocab.queries)
        with self._vocab_lock:
            if key in self._vocabularies:
                self._vocabularies.move_to_end(key)
                return self._vocabularies[key]
        seg = self.segmenter.with_classes(vocab)
        with self._vocab_lock:
            self._vocabularies[key] = seg
            while len(self._vocabularies) > self.settings.vocabularies_cached:
                self._vocabularies.popitem(last=False)
        return seg

    def decode(self, data: bytes, classes: Optional[str]) -> tuple[Any, np.ndarray]:
        """The request's segmenter and its image (runs on the pool)."""
        check_image(data, self.settings.max_pixels)
        try:
            rgb = decode_image(data, "the image")
        except UserError as e:
            raise RequestError(400, str(e)) from None
        return self.for_classes(classes), rgb

    async def infer(self, seg: Any, rgb: np.ndarray) -> Segmentation:
        """One image's labels: on the pool here; Ray Serve replicas batch clients instead
        (ray_serve.py)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(seg.segment, rgb, with_probs=False))

    def encode(self, rgb: np.ndarray, result: Segmentation, fmt: str, overlay: bool,
               ) -> tuple[bytes, str]:
        """The answer's body and media type (runs on the pool)."""
        names = list(result.class_names)
        if fmt == "png" and overlay:
            return overlay_jpeg_bytes(rgb, result), "image/jpeg"
        if fmt == "png":
            return label_png_bytes(result.labels, len(names)), "image/png"
        fractions = class_fractions(result.labels, len(names))
        present = sorted(fractions, key=lambda c: -fractions[c])
        colours = palette(len(names))
        body: dict[str, Any] = {"height": int(result.labels.shape[0]),
                                "width": int(result.labels.shape[1]), "classes": names,
                                "fractions": {names[c]: round(fractions[c], 6) for c in present},
                                # the overlay's colours, so that a client's legend matches it
                                "colors": {names[c]: "#" + colours[c].tobytes().hex()
                                           for c in present}}
        if fmt == "rle":
            body["masks"] = {names[c]: rle(result.labels == c) for c in sorted(fractions)}
        if overlay:
            body["overlay_jpeg"] = base64.b64encode(overlay_jpeg_bytes(rgb, result)).decode()
        return json.dumps(body).encode(), "application/json"

    async def segment(self, data: bytes, fmt: str, overlay: bool, classes: Optional[str],
                      ) -> tuple[bytes, str]:
        """Decode, segment and encode one image -> (body, media type); graph and image work
        runs off the event loop."""
        loop = asyncio.get_running_loop()
        seg, rgb = await loop.run_in_executor(self.pool, self.decode, data, classes)
        try:
            result = await self.infer(seg, rgb)
        except UserError as e:
            raise RequestError(422, str(e)) from None
        return await loop.run_in_executor(self.pool, self.encode, rgb, result, fmt, overlay)


async def read_limited(stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request is larger than this service's {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(segmenter: Any, settings: Optional[ServeSettings] = None,
               service: Optional["Service"] = None) -> Any:
    """The FastAPI app around one segmenter (the same app runs under uvicorn or Ray Serve,
    whose replicas give their own ``service``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    settings = settings or ServeSettings()
    service = service or Service(segmenter, settings)
    page = page_files()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # One small image through every graph before /readyz says ready: the first client
        # does not pay for lazy initialisation.
        blank = np.full((64, 64, 3), 127, np.uint8)
        await asyncio.get_running_loop().run_in_executor(
            service.pool, functools.partial(segmenter.segment, blank, False))
        service.ready = True
        yield
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="resclip-deploy", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.service = service
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization"])

    def error(status: int, message: str, reason: str,
              headers: Optional[dict[str, str]] = None) -> JSONResponse:
        service.errors.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = request.url.path
        start = time.perf_counter()
        if settings.token is not None and (endpoint.startswith("/v1/") or
                                           endpoint == "/metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
                response = error(401, "a bearer token is required (Authorization: Bearer ...)",
                                 "token", {"WWW-Authenticate": "Bearer"})
                service.requests.labels(endpoint, 401).inc()
                return response
        try:
            response = await call_next(request)
        except Exception as e:    # nothing a client sends may take the process down
            response = error(500, f"internal error ({type(e).__name__})", "internal")
        known = endpoint if endpoint in ("/v1/segment", "/v1/info", "/healthz", "/readyz",
                                         "/metrics") else "other"
        service.requests.labels(known, response.status_code).inc()
        service.latency.labels(known).observe(time.perf_counter() - start)
        return response


    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name == "index.html" or name not in page:
            return error(404, f"/static/{name}: no such file", "not_found")
        return Response(page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return service.info()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/segment")
    async def segment(request: Request) -> Response:
        q = request.query_params
        fmt = q.get("format", "png")
        if fmt not in FORMATS:
            return error(400, f"format={fmt!r}: choose one of {', '.join(FORMATS)}", "format")
        overlay = q.get("overlay", "false").lower()
        if overlay not in ("true", "false", "1", "0"):
            return error(400, f"overlay={overlay!r}: true or false", "overlay")
        classes = q.get("classes")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            return error(413, f"the request is larger than this service's "
                              f"{settings.max_request_bytes} bytes", "too_large")
        if not service.admit():
            return error(503, f"{service.in_flight} images in flight, this service's limit; "
                              "retry shortly", "busy", {"Retry-After": "1"})
        work = None
        try:
            body = await read_limited(request.stream(), settings.max_request_bytes)
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                body = await _multipart_image(body, request.headers)
            if not body:
                raise RequestError(400, "the request has no image (send it as the body or as "
                                        "the multipart field 'image')")
            work = asyncio.ensure_future(service.segment(body, fmt, overlay in ("true", "1"),
                                                         classes))
            # the slot is held until the work ends, even when the client was answered 504
            work.add_done_callback(service.release)
            try:
                data, media = await asyncio.wait_for(asyncio.shield(work), settings.timeout_s)
            except asyncio.TimeoutError:
                return error(504, f"the image took longer than this service's "
                                  f"{settings.timeout_s:g} s", "timeout")
            return Response(data, media_type=media)
        except RequestError as e:
            return error(e.status, e.message, f"http_{e.status}", e.headers)
        finally:
            if work is None:
                service.release()

    return app


def page_files() -> dict[str, bytes]:
    """The page's files, read from the package once: an install without them fails when the
    app is built, not on a visitor's request."""
    from importlib import resources
    folder = resources.files("resclip_deploy").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in PAGE_FILES}


async def _multipart_image(body: bytes, headers: Any) -> bytes:
    """The ``image`` file field (or the only file) of a multipart body already read."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncIterator[bytes]:
        yield body
    try:
        form = await MultiPartParser(headers, replay(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise RequestError(400, f"the multipart body is malformed ({e.message})") from None
    files = [v for _, v in form.multi_items() if hasattr(v, "read")]
    item = form.get("image") if hasattr(form.get("image"), "read") else \
        (files[0] if len(files) == 1 else None)
    if item is None:
        raise RequestError(400, "the multipart body has no file field 'image'")
    data = await item.read()
    await form.close()
    return data


# --- the command -------------------------------------------------------------------------------


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise UserError(f"--token-file {path} cannot be read: {e.strerror or e}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UserError(f"--token-file {path}: the token must be one line of at least 16 "
                        "characters without spaces (e.g. from: openssl rand -hex 32)")
    return token


def check_exposure(host: str, token: Optional[str], insecure: bool) -> None:
    """Beyond loopback a token is required, or the explicit --insecure-no-token."""
    if host not in LOOPBACK and token is None and not insecure:
        raise UserError(f"--host {host} listens beyond this machine: give --token-file FILE (a "
                        "bearer token clients must send), or --insecure-no-token to serve "
                        "without one")


def _serve_command() -> Any:
    import click

    from .cli import _setup_logging, device_option, user_errors

    @click.command("resclip-serve", context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("bundle_dir", type=click.Path(file_okay=False))
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on (beyond loopback needs --token-file).")
    @click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
    @device_option()
    @click.option("--threads", type=int, default=None, help="CPU threads for the graphs.")
    @click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                  help="A file holding the bearer token clients must send.")
    @click.option("--insecure-no-token", is_flag=True,
                  help="Serve beyond loopback without a token.")
    @click.option("--cors-origin", "cors_origins", multiple=True,
                  help="An origin browsers may call from (repeatable; default: CORS off).")
    @click.option("--max-request-mb", type=click.FloatRange(min=0.001), default=32.0,
                  show_default=True)
    @click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000,
                  show_default=True, help="Decoded pixels per image (checked from the header).")
    @click.option("--max-in-flight", type=click.IntRange(min=1), default=4, show_default=True,
                  help="Images admitted at once; the next gets 503 with Retry-After.")
    @click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Images segmented at once (each uses every core already).")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=60.0,
                  show_default=True, help="Seconds before a request gets 504.")
    @click.option("--ray", "use_ray", is_flag=True,
                  help="Serve as a Ray Serve deployment (the [ray] extra) instead of one process.")
    @click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
                  help="--ray: replicas of the segmenter.")
    @click.option("--autoscale", default=None, metavar="MIN-MAX",
                  help="--ray: an autoscaling range of replicas instead of --replicas, e.g. 1-8.")
    @click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=None,
                  help="--ray: CPUs each replica asks Ray for (ONNX Runtime threads follow); "
                       "default: this machine's CPUs / replicas.")
    @click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0,
                  show_default=True, help="--ray: GPUs each replica asks Ray for.")
    @click.option("--max-batch", type=click.IntRange(min=1), default=None,
                  help="--ray: images of concurrent requests per graph run (Ray Serve's "
                       "batching); default 4 with --gpus-per-replica, else 1.")
    @click.option("--ray-address", default=None,
                  help="--ray: an existing cluster (e.g. auto, ray://head:10001); default: "
                       "start Ray on this machine.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @user_errors
    def serve_main(bundle_dir: str, host: str, port: int, device: str, threads: Optional[int],
                   token_file: Optional[str], insecure_no_token: bool,
                   cors_origins: tuple[str, ...], max_request_mb: float, max_pixels: int,
                   max_in_flight: int, workers: int, timeout_s: float, use_ray: bool,
                   replicas: int, autoscale: Optional[str], cpus_per_replica: Optional[float],
                   gpus_per_replica: float, max_batch: Optional[int],
                   ray_address: Optional[str], quiet: bool) -> None:
        """Serve a bundle over HTTP: POST /v1/segment, GET /healthz /readyz /v1/info /metrics."""
        _setup_logging(quiet)
        token = read_token(token_file) if token_file else None
        check_exposure(host, token, insecure_no_token)
        settings = ServeSettings(max_request_bytes=int(max_request_mb * (1 << 20)),
                                 max_pixels=max_pixels, max_in_flight=max_in_flight,
                                 workers=workers, timeout_s=timeout_s, token=token,
                                 cors_origins=cors_origins)
        if use_ray:
            if threads is not None:
                raise UserError("--threads: with --ray each replica's threads follow its "
                                "--cpus-per-replica; leave --threads out")
            _serve_on_ray(bundle_dir, device, settings, host, port, replicas,
                          _replica_range(autoscale), cpus_per_replica, gpus_per_replica,
                          max_batch, ray_address)
            return
        if (autoscale or cpus_per_replica is not None or gpus_per_replica or ray_address
                or max_batch):
            raise UserError("--autoscale, --cpus-per-replica, --gpus-per-replica, --max-batch "
                            "and --ray-address need --ray")
        with needs_extra("resclip-serve", "serve"):
            import fastapi  # noqa: F401
            import uvicorn
            from PIL import Image  # noqa: F401
            from prometheus_client import Counter  # noqa: F401
        from .runtime.segmenter import Segmenter
        segmenter = Segmenter.from_bundle(bundle_dir, device=device, threads=threads)
        uvicorn.run(create_app(segmenter, settings), host=host, port=port,
                    log_level="warning" if quiet else "info", access_log=not quiet)
    return serve_main


def _replica_range(text: Optional[str]) -> Optional[tuple[int, int]]:
    if text is None:
        return None
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"--autoscale {text!r}: give MIN-MAX replicas, e.g. 1-8") from None
    return lo, hi


def _serve_on_ray(bundle_dir: str, device: str, settings: ServeSettings, host: str, port: int,
                  replicas: int, autoscale: Optional[tuple[int, int]],
                  cpus_per_replica: Optional[float], gpus_per_replica: float,
                  max_batch: Optional[int], address: Optional[str]) -> None:
    with needs_extra("resclip-serve --ray", "ray"):
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
        import fastapi  # noqa: F401
    from . import ray_serve
    if cpus_per_replica is None:
        cpus_per_replica = float(cpus((autoscale or (0, replicas))[1]))
    ray_serve.run(ray_serve.application(bundle_dir, device, settings, replicas, autoscale,
                                        cpus_per_replica, gpus_per_replica, max_batch),
                  host, port, address)


def serve_entry() -> None:
    from .cli import run_command
    run_command(_serve_command())


if __name__ == "__main__":
    serve_entry()
