"""`lmserve serve`: load every deployment (failing fast on a bad one), then run uvicorn."""

from __future__ import annotations

import logging
import sys

from lmserve.config import ConfigError, DeploymentConfig


def serve(config: DeploymentConfig) -> int:
    import uvicorn

    from lmserve.backends.base import Backend
    from lmserve.backends.local import LocalBackend
    from lmserve.backends.upstream import UpstreamBackend
    from lmserve.platform.service import Platform
    from lmserve.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The database first: a wrong URL fails in a second, not after the models have loaded.
    platform = Platform(config.platform, {d.id: d for d in config.models}, config.server.api_keys)
    print(f"platform database: {_redacted(config.platform.db_url)}", file=sys.stderr, flush=True)
    try:
        platform.start()
    except Exception as e:  # a wrong URL, a server that is down: one line, exit 2
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "Redis" if type(e).__module__.startswith("redis") else "the platform database"
        raise ConfigError(f"cannot use {what}: {reason}") from None
    backends: dict[str, Backend] = {}
    for deployment in config.models:
        if deployment.upstream:
            print(f"{deployment.id}: upstream {', '.join(deployment.upstream['base_urls'])}", file=sys.stderr)
            backends[deployment.id] = UpstreamBackend(deployment, config.defaults, config.server.max_n)
            continue
        print(f"loading {deployment.id} from {deployment.path} ...", file=sys.stderr, flush=True)
        backends[deployment.id] = LocalBackend(deployment, config.defaults, config.server.max_n)
    app = create_app(config, backends, platform)

    server = config.server
    base = f"http://{server.host}:{server.port}/v1"
    key = server.api_keys[0]
    first_model = config.models[0].id
    origin = "generated for this run" if server.generated_key else "from config/LMSERVE_API_KEYS"
    print(f"\nlmserve: serving {', '.join(backends)}\n  base URL: {base}\n  API key:  {key}  ({origin})\n"
          f"  try:\n    curl {base}/chat/completions -H 'Authorization: Bearer {key}' "
          f"-H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{first_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
          f"  metered keys for others: lmserve keys create --account NAME  (with this server's --config)\n",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level="warning", access_log=False)
    finally:
        for backend in backends.values():
            if isinstance(backend, LocalBackend):
                backend.shutdown()  # the engine threads, also when uvicorn never started
    return 0


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
