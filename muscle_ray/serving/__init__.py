"""Serving the updated model on Ray Serve: OpenAI-compatible completions and chat, old-vs-new compare, shadow mode."""
