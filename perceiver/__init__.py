"""Exp 13's own parts: the Perceiver model (and its attention-map callback), the LAMB optimizer, ModelNet40 point clouds."""
