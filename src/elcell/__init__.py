"""elcell: find cracks and inactive regions in EL images of solar cells.

Kept import-light: `import elcell` must not pull in PyTorch, so inference on
an inspection PC stays small.
"""

__version__ = "0.1.0"
