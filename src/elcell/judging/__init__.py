"""Telling models and recipes apart: the k-fold protocol's files, bootstrap
intervals, scoring labelled cells, and `elcell compare`. Torch-free."""
