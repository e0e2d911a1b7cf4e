"""The same FastAPI app as a Ray Serve deployment (the ``[ray]`` extra).

Three ways to run it, all building :func:`application`:

    resclip-serve BUNDLE --ray --replicas 2             # starts a local Ray, or --ray-address
    serve run resclip_deploy.ray_serve:app bundle=/models/ade20k replicas=2
    serve deploy config.yaml                            # import_path: resclip_deploy.ray_serve:app

Each replica asks Ray for ``cpus_per_replica`` CPUs (or GPUs) and gives ONNX Runtime as many
threads as it was granted. With ``max_batch`` > 1 a replica gathers the images of concurrent
requests with Ray Serve's own ``serve.batch`` and runs their windows through the graphs together
(``Segmenter.segment_many``): what pays on a GPU; on a CPU one image already fills every core.

The bundle path must be readable at the same absolute path on every node that may host a
replica (a shared or replicated volume).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any, Optional

import numpy as np
from prometheus_client import Histogram

from .errors import UserError
from .serve import Service, ServeSettings, create_app

DEPLOYMENT = "resclip"


def granted_threads() -> Optional[int]:
    """ONNX Runtime threads for this replica: the CPUs Ray granted it (None outside Ray, or
    when it was granted none: ONNX Runtime's default)."""
    import ray
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


class BatchedService(Service):
    """The service with the images of concurrent requests segmented together: up to
    ``max_batch`` of them, gathered for at most ``wait_s`` by ``serve.batch``."""

    def __init__(self, segmenter: Any, settings: ServeSettings, max_batch: int, wait_s: float):
        from ray import serve
        # every gathered request holds a pool thread while it decodes and encodes
        super().__init__(segmenter, replace(settings,
                                            workers=max(settings.workers, max_batch)))
        self.batch_sizes = Histogram("resclip_batch_images", "Images per graph run",
                                     registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16))

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def run(items: list[tuple[Any, np.ndarray]]) -> list[Any]:
            self.batch_sizes.observe(len(items))
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, segment_groups, items)
        self._run = run

    async def infer(self, seg: Any, rgb: np.ndarray) -> Any:
        result = await self._run((seg, rgb))
        if isinstance(result, UserError):
            raise result
        return result


def segment_groups(items: list[tuple[Any, np.ndarray]]) -> list[Any]:
    """(segmenter, image) pairs -> their results, each segmenter's images in one
    ``segment_many``; an image that fails gets its error, the others their results."""
    results: list[Any] = [None] * len(items)
    by_segmenter: dict[int, list[int]] = {}
    for i, (seg, _) in enumerate(items):
        by_segmenter.setdefault(id(seg), []).append(i)
    for members in by_segmenter.values():
        seg = items[members[0]][0]
        try:
            done = seg.segment_many([items[i][1] for i in members], with_probs=False)
        except UserError:       # find which: one by one
            done = []
            for i in members:
                try:
                    done.append(seg.segment(items[i][1], with_probs=False))
                except UserError as e:
                    done.append(e)
        for i, result in zip(members, done):
            results[i] = result
    return results


class Replica:
    """One replica: the segmenter loaded once, the service app built around it (Ray Serve
    calls ``__serve_build_asgi_app__`` after the constructor, in the replica's process)."""

    def __init__(self, bundle_dir: str, device: str, settings: ServeSettings,
                 max_batch: int = 1, batch_wait_s: float = 0.01):
        from .runtime.segmenter import Segmenter
        self.segmenter = Segmenter.from_bundle(bundle_dir, device=device,
                                               threads=granted_threads())
        self.settings = settings
        self.service = BatchedService(self.segmenter, settings, max_batch, batch_wait_s) \
            if max_batch > 1 else None

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.segmenter, self.settings, self.service)


def application(bundle_dir: str, device: str = "auto",
                settings: Optional[ServeSettings] = None, replicas: int = 1,
                autoscale: Optional[tuple[int, int]] = None, cpus_per_replica: float = 1.0,
                gpus_per_replica: float = 0.0, max_batch: Optional[int] = None) -> Any:
    """The Ray Serve application: ``replicas`` copies, or an autoscaling range (min, max)
    driven by requests in flight per replica. ``max_batch``: images of concurrent requests
    per graph run (default: 4 with a GPU per replica, else 1)."""
    from ray import serve
    settings = settings or ServeSettings()
    if not os.path.isdir(bundle_dir):
        raise UserError(f"{bundle_dir} is not a bundle folder (give the folder resclip-export "
                        "wrote)")
    if max_batch is None:
        max_batch = 4 if gpus_per_replica > 0 else 1
    if max_batch < 1:
        raise UserError(f"max batch {max_batch}: give at least 1")
    lo, hi = autoscale or (0, 1)
    if replicas < 1 or not 0 <= lo <= hi or hi < 1:
        raise UserError("replicas must be at least 1 and the autoscaling range MIN <= MAX, "
                        "MAX at least 1")
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # Ray's own admission per replica; ours (503 + Retry-After) stays the per-replica limit
        "max_ongoing_requests": settings.max_in_flight,
        "health_check_period_s": 5,
        # a replica being stopped finishes what it has admitted, within one request timeout
        "graceful_shutdown_timeout_s": settings.timeout_s}
    if autoscale:
        options["autoscaling_config"] = {
            "min_replicas": autoscale[0], "max_replicas": autoscale[1],
            "target_ongoing_requests": max(1, settings.workers)}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(Replica), **options)
    return deployment.bind(os.path.abspath(bundle_dir), device, settings, max_batch)


def _number(args: dict[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in args:
        return default
    try:
        return kind(args[key])
    except ValueError:
        raise UserError(f"{key}={args[key]!r}: give a {kind.__name__}") from None


def app(args: dict[str, str]) -> Any:
    """The application builder ``serve run`` and Serve config files call with their
    ``key=value`` arguments: bundle (required), device, replicas, min_replicas, max_replicas,
    cpus_per_replica, gpus_per_replica, token_file, max_in_flight, timeout_s, max_batch."""
    from .serve import read_token
    known = {"bundle", "device", "replicas", "min_replicas", "max_replicas", "cpus_per_replica",
             "gpus_per_replica", "token_file", "max_in_flight", "timeout_s", "max_batch"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError(f"unknown argument(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    if "bundle" not in args:
        raise UserError("give the bundle: serve run resclip_deploy.ray_serve:app "
                        "bundle=/path/to/bundle")
    settings = replace(ServeSettings(),
                       token=read_token(args["token_file"]) if "token_file" in args else None,
                       max_in_flight=_number(args, "max_in_flight", int, 4),
                       timeout_s=_number(args, "timeout_s", float, 60.0))
    lo, hi = _number(args, "min_replicas", int, None), _number(args, "max_replicas", int, None)
    return application(args["bundle"], args.get("device", "auto"), settings,
                       _number(args, "replicas", int, 1),
                       (lo or 0, hi) if hi is not None else None,
                       _number(args, "cpus_per_replica", float, 1.0),
                       _number(args, "gpus_per_replica", float, 0.0),
                       _number(args, "max_batch", int, None))


def run(application_: Any, host: str, port: int, address: Optional[str]) -> None:
    """Serve ``application_`` on HTTP ``host:port`` until SIGTERM or Ctrl-C; a Ray started here
    (no ``address``) is shut down on the way out, an existing cluster only loses the app."""
    import signal
    import threading

    import ray
    from ray import serve
    started_here = address is None and not ray.is_initialized()
    ray.init(address=address, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application_, name=DEPLOYMENT, route_prefix="/")
        print(f"resclip-serve: Ray Serve on http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(DEPLOYMENT)
