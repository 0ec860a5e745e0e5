"""`lmserve serve`: bind the port, then load every deployment while the port answers
`503 loading`, then serve.

Binding first means a port in use fails in a second instead of after the models load, and an
orchestrator can probe /health (liveness) from the start. Models load on a worker thread; uvicorn
runs on the main thread (it owns the signal handlers)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
import time

from lmserve.config import DeploymentConfig

log = logging.getLogger("lmserve.server")


class PortInUse(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or PortInUse / OSError with a message for a human."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is already in use (another lmserve?); "
                            "stop it or pick another port with --port") from None
        if e.errno == errno.EACCES:
            raise OSError(f"no permission to bind port {port} on {host} (ports below 1024 need root)") from None
        raise OSError(f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def serve(config: DeploymentConfig) -> int:
    server = config.server
    try:
        sock = bind(server.host, server.port)  # before any heavy import: a busy port fails at once
    except OSError as e:
        print(f"lmserve serve: {e}", file=sys.stderr, flush=True)
        return 1

    from lmserve.platform.service import Platform
    from lmserve.server.app import create_app
    from lmserve.server.lifecycle import Lifecycle
    from lmserve.server.logs import setup_logging
    from lmserve.server.shutdown import draining_server

    setup_logging(server.log_level, server.log_format)
    from lmserve.device import set_cpu_threads

    log.info("CPU threads for the model: %d", set_cpu_threads(server.threads))
    # The database next: a wrong URL fails in a second, not after the models have loaded.
    # A generated key is not imported here but adopted once the models load (_load_all): it belongs
    # to this run only, and a start that fails leaves no key behind.
    platform = Platform(config.platform, {d.id: d for d in config.models},
                        [] if server.generated_key else config.server.api_keys)
    log.info("platform database: %s", _redacted(config.platform.db_url))
    try:
        platform.start()
    except Exception as e:  # a wrong URL, a server that is down: one line, exit 2
        sock.close()
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "Redis" if type(e).__module__.startswith("redis") else "the platform database"
        print(f"lmserve serve: cannot use {what}: {reason}", file=sys.stderr, flush=True)
        return 2

    from lmserve.backends.factory import prepare_backends

    prepare_backends(config)
    backends: dict = {}
    lifecycle = Lifecycle(total_models=len(config.models))
    app = create_app(config, backends, platform, lifecycle)
    # SIGTERM/SIGINT drain the server (lmserve.server.shutdown); it then returns normally.
    uv = draining_server(app, server, log_level=server.log_level if server.log_level != "info" else "warning",
                         access_log=False, log_config=None)
    log.info("listening on http://%s:%d (503 loading until the models are ready)", server.host, server.port)
    loader = threading.Thread(target=_load_all, args=(config, backends, lifecycle, uv, platform),
                              name="lmserve-loader", daemon=True)
    loader.start()
    interrupted = None
    try:
        uv.run(sockets=[sock])
    except KeyboardInterrupt as e:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        interrupted = e
    finally:
        for backend in list(backends.values()):
            backend.shutdown()  # the engine threads, also when uvicorn never started
        sock.close()
        platform.release_generated_key()
    if lifecycle.phase == "failed":
        print(f"lmserve serve: {lifecycle.error}", file=sys.stderr, flush=True)
        return 2
    if lifecycle.phase == "loading":
        # Stopped (Ctrl-C, SIGTERM) while a model was still loading: one line, and no waiting
        # for the load itself, which cannot be interrupted.
        print("lmserve serve: stopped while loading", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    if interrupted is not None:
        raise interrupted
    return 0


def _load_all(config: DeploymentConfig, backends: dict, lifecycle, uv, platform) -> None:
    from lmserve.backends.factory import build_backend

    loaded = {}
    try:
        for i, deployment in enumerate(config.models, 1):
            t0 = time.monotonic()
            if deployment.upstream:
                log.info("model %d/%d: %s via upstream %s", i, len(config.models), deployment.id,
                         ", ".join(deployment.upstream["base_urls"]))
            else:
                log.info("loading model %d/%d: %s from %s", i, len(config.models), deployment.id,
                         deployment.source)
            backend = loaded[deployment.id] = build_backend(config, deployment)
            lifecycle.loaded.append(deployment.id)
            log.info("model %s ready in %.1fs (%s)", deployment.id, time.monotonic() - t0, backend.describe())
    except BaseException as e:  # noqa: BLE001 - any load failure stops the server with its message
        for backend in loaded.values():
            backend.shutdown()
        lifecycle.error = _load_error(deployment, e)
        lifecycle.phase = "failed"
        uv.should_exit = True
        return
    if config.server.generated_key:
        from lmserve.platform.keys import instance_owner

        try:
            platform.adopt_generated_key(config.server.api_keys[0], instance_owner(config.server.port))
        except Exception as e:  # noqa: BLE001 - the database failed between start and now
            for backend in loaded.values():
                backend.shutdown()
            lifecycle.error = f"cannot record the generated API key: {e}"
            lifecycle.phase = "failed"
            uv.should_exit = True
            return
    backends.update(loaded)
    lifecycle.phase = "ready"
    log.info("ready in %.1fs", time.monotonic() - lifecycle.started)
    print(banner(config), file=sys.stderr, flush=True)


def _load_error(deployment, exc: BaseException) -> str:
    from lmserve.models.loader import CheckpointError

    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, (ValueError, TypeError, NotImplementedError, OSError)):
        return f"cannot load model {deployment.id!r} from {deployment.source}: {exc}"
    log.error("loading %s failed", deployment.id, exc_info=exc)
    return f"cannot load model {deployment.id!r} from {deployment.source}: {type(exc).__name__}: {exc}"


def banner(config: DeploymentConfig) -> str:
    server = config.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    origin_url = f"http://{host}:{server.port}"
    base = f"{origin_url}/v1"
    key = server.api_keys[0]
    first_model = config.models[0].id
    if server.generated_key:
        origin = ("generated for this run; pin one with --api-key KEY or LMSERVE_API_KEYS=KEY "
                  "(or server.api_keys in the config)")
    else:
        origin = "from the config, --api-key or LMSERVE_API_KEYS"
    return (f"\nlmserve: serving {', '.join(m.id for m in config.models)}\n"
            f"  playground: {origin_url}/playground   (console: {origin_url}/console)\n  base URL: {base}\n"
            f"  API key:  {key}  ({origin})\n"
            f"  try:\n    curl {base}/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{first_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
            f"  metered keys for others: lmserve keys create --account NAME  (with this server's --config)\n")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
