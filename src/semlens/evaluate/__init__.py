"""Measuring semlens outputs: explanation-quality metrics and the method comparison runner
(:mod:`semlens.evaluate.explanations`, :mod:`semlens.evaluate.compare`), and captioning metrics
(:mod:`semlens.evaluate.captioning`)."""
