"""Measuring semlens outputs: explanation-quality metrics and the method comparison runner
(:mod:`semlens.evaluate.explanations`, :mod:`semlens.evaluate.compare`). Captioning metrics live in
:mod:`semlens.captioning.evaluation`."""
