"""Judging cells with an exported model on ONNX Runtime: the runtime and its
metadata, predict, evaluate, metrics and plots, heatmaps and explain, reports,
and the int8 export. Torch-free: this is what an inspection PC runs."""
