"""Backend construction: the one place that turns a deployment of the config into the Backend
serving it, so the server knows neither engines nor upstream clients."""

from __future__ import annotations

from pathlib import Path

from lmserve.backends.base import Backend
from lmserve.config import DeploymentConfig, ModelDeployment


def prepare_backends(config: DeploymentConfig) -> None:
    """Process-wide setup, once, before the first backend is built."""
    if any(m.engine.compile for m in config.models):
        from lmserve.engine.compiled_decode import use_cache_dir

        # Compiled kernels persist next to the database, so a restart compiles in seconds.
        use_cache_dir(Path(config.platform.data_dir).expanduser() / "compile-cache")


def build_backend(config: DeploymentConfig, deployment: ModelDeployment) -> Backend:
    """The backend for `deployment`, loaded and ready to serve (seconds to minutes for a local
    model; blocking: call it off the event loop)."""
    if deployment.upstream:
        from lmserve.backends.upstream import UpstreamBackend

        return UpstreamBackend(deployment, config.generation_defaults(deployment), config.server.max_n)
    from lmserve.backends.local import LocalBackend

    backend = LocalBackend(deployment, config.generation_defaults(deployment), config.server.max_n)
    # The checkpoint's recommended sampling values are known only once it is resolved.
    backend.defaults = config.generation_defaults(deployment, backend.checkpoint_generation_config())
    return backend
