"""Training side (PyTorch, Lightning, kornia): options and recipes, data and
augmentation, the LightningModule, train, pretrain, the k-fold driver,
distillation and the ONNX export. Networks live in elcell.training.nets.

Some modules here are torch-free (config, weights, distill) so that the command
line can read options without importing PyTorch; this package's __init__
imports nothing."""
