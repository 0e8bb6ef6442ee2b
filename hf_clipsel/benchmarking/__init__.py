"""Experiment tools, not the core: seeded label noise and image corruptions (``noise``) for the robustness
benchmarks and the demo."""
