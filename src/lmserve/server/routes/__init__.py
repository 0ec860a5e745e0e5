"""The API's routers, one per concern: health and metrics, models and the caller's account,
generation (chat and legacy completions), tokenize. Admin, files, batches and the web pages
have theirs beside the server modules they need (server/admin.py, files.py, batches.py, ui.py)."""
