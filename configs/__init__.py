"""Training recipes (YAML, one per family) and downstream (mmdet/mmseg) configs, shipped as package data."""
