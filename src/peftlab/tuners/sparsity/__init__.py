"""The sparsity methods: PST (pst.py), the magnitude- and movement-pruning baselines (magnitude.py,
movement.py), what they share (base.py) and the export of sparsified models (export.py)."""

from . import magnitude, movement, pst  # noqa: F401  (registers the methods)
