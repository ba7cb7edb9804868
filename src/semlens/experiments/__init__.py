"""Experiments composed from the library: the demo pipeline and ``semlens reproduce ...``."""
