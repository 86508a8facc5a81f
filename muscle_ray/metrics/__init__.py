"""Compatibility metrics: flips between two (or three) result sets of the same task."""
