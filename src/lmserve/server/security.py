"""The security headers of every response, set in one place (a pure ASGI middleware outside all
the others, so error responses, static files, redirects and streams get them too):

- `X-Content-Type-Options: nosniff` on everything: a browser never runs an API answer or a log
  excerpt as a script or page because its bytes look like one.
- On every HTML response (the playground, the console, the API docs, anything added later): a
  content security policy that allows this origin's own files and nothing else. The pages keep
  the API key in sessionStorage, so a script from elsewhere must have no way in.
- On everything: no framing from any origin (`frame-ancestors 'none'`, and `X-Frame-Options:
  DENY` for browsers without CSP 2), so no other site can overlay or drive a page of this server
  (an error page or a JSON answer included), and no Referer leaving it.
- Redirects keep to this server: a `Location` is sent as a path, never as a URL built from the
  request's Host header (which the client chooses)."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders

# The pages: scripts, styles and API calls from this origin only; no inline script or style.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

# ReDoc (styled-components) writes its styles into <style> elements at run time, which a CSP
# without 'unsafe-inline' for styles blocks (the page renders unstyled); its scripts are held to
# this origin like everywhere else, and its search index runs in a worker made from a blob.
REDOC_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "connect-src 'self'; worker-src 'self' blob:; object-src 'none'; frame-ancestors 'none'; "
             "base-uri 'none'; form-action 'none'")

_CSP_BY_PATH = {"/redoc": REDOC_CSP}

# Anything that is not HTML (JSON, metrics, scripts, styles): only the framing rule. Fetch and XHR
# callers ignore a response's CSP; a browser showing the answer as a document obeys it.
OTHER_CSP = "frame-ancestors 'none'"

_EVERY_RESPONSE = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def html_csp(path: str) -> str:
    return _CSP_BY_PATH.get(path, PAGE_CSP)


def relative_location(location: str) -> str:
    """`location` as a path on this server. Starlette builds the URL of a slash redirect
    (`/ui` -> `/ui/`) from the request's Host header; this server never sends a client to another
    origin, so only the path, query and fragment are kept. Leading slashes collapse to one: a
    `//host/...` path would otherwise be read as a URL on `host`. A relative reference
    (`next`, `../x`) is already on this server and stays as it is."""
    parts = urlsplit(location)
    if not (parts.scheme or parts.netloc or location.startswith(("/", "\\"))):
        return location
    path = "/" + parts.path.lstrip("/\\")
    return path + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _EVERY_RESPONSE.items():
                    headers[name] = value
                html = headers.get("content-type", "").lower().startswith("text/html")
                headers["content-security-policy"] = html_csp(scope["path"]) if html else OTHER_CSP
                if "location" in headers:
                    headers["location"] = relative_location(headers["location"])
            await send(message)

        await self.app(scope, receive, send_secured)
