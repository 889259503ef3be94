"""Whole PV modules (panels), not to be confused with the LightningModule in
elcell.training: finding a module's cell grid, judging one module in memory
(judge), grading and its rules, the module map, `elcell inspect` and
`elcell segment`, and synthetic modules for tests and benchmarks. Torch-free."""
