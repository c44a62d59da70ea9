"""grounded-serve: a Label Studio ML backend for Grounding DINO + SAM on Ray Serve."""

__version__ = "0.1.0"
