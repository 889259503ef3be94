"""`elcell serve`: the FastAPI app, its request guard, the micro-batcher, kept
results, the review loop, the JSON schemas and the static page. Torch-free."""
