"""Serving the updated model on Ray Serve: OpenAI-compatible completions, old-vs-new compare, shadow mode."""
