"""Experiments: the application layer (``mechinterp run configs/...``).

Modules here may import :mod:`mechinterp.models` and :mod:`mechinterp.train`; nothing in
the ``mechinterp`` core imports them.
"""
