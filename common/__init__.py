"""Leaf helpers shared by every component (``nerf/``, ``guidance/``, ``main.py``): config
fields that carry their command-line help (``config.py``), atomic file writes (``files.py``)
and a forked random stream (``rng.py``). Imports nothing of the project."""
