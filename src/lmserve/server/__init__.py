"""The HTTP layer: the chat-completions API of shared/API.md over the backends."""
