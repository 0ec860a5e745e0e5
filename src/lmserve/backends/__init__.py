"""Where a deployed model id is served: in this process (LocalBackend) or upstream (later)."""
