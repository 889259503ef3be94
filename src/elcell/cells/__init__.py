"""Cells as data: decoding images to arrays, label tables, and collecting the
inputs a command was given (files, folders, CSVs). Torch-free; imports only
elcell's basics (errors, io, options)."""
