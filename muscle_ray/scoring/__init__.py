"""Scoring model versions on tasks: HF / vLLM backends and the Ray Data batch-inference job."""

from muscle_ray.scoring.config import ScoreConfig, VersionSpec

__all__ = ["ScoreConfig", "VersionSpec"]
