"""`lmserve serve`: load every deployment (failing fast on a bad one), then run uvicorn."""

from __future__ import annotations

import logging
import sys

from lmserve.config import DeploymentConfig


def serve(config: DeploymentConfig) -> int:
    import uvicorn

    from lmserve.backends.local import LocalBackend
    from lmserve.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backends: dict[str, LocalBackend] = {}
    for deployment in config.models:
        print(f"loading {deployment.id} from {deployment.path} ...", file=sys.stderr, flush=True)
        backends[deployment.id] = LocalBackend(deployment, config.defaults, config.server.max_n)
    app = create_app(config, backends)

    server = config.server
    base = f"http://{server.host}:{server.port}/v1"
    key = server.api_keys[0]
    first_model = config.models[0].id
    origin = "generated for this run" if server.generated_key else "from config/LMSERVE_API_KEYS"
    print(f"\nlmserve: serving {', '.join(backends)}\n  base URL: {base}\n  API key:  {key}  ({origin})\n"
          f"  try:\n    curl {base}/chat/completions -H 'Authorization: Bearer {key}' "
          f"-H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{first_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level="warning", access_log=False)
    finally:
        for backend in backends.values():
            backend.shutdown()
    return 0
