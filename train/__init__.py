"""Classification training, validation and model benchmarks (``visionattn train|validate|bench models``)."""
