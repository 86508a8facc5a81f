"""Adapter training: the MUSCLE loss, teacher placements, and Ray Train jobs."""
