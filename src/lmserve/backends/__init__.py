"""Where a deployed model id is served: in this process (local.LocalBackend) or by an upstream
OpenAI-compatible API (upstream.UpstreamBackend), both behind the protocol in base.py and built
by factory.build_backend."""
