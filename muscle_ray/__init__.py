"""muscle-ray: compatible LLM updates (MUSCLE, arXiv 2407.09435) on Ray."""

__version__ = "0.1.0"
