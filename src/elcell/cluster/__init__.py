"""Scoring archives on Ray Data (the optional `elcell[cluster]` extra): `elcell
predict --ray` and `elcell inspect --ray`. Torch-free, as inference is; imported
only when --ray is given, so no other command ever imports Ray."""
