"""semlens: make deep neural networks readable.

Library layout (one home per concept):

- :mod:`semlens.layers` — dotted-name lookup, scoped activation capture/patching, state freezing.
- :mod:`semlens.explain` — gradients, sensitivity analysis and layer-wise relevance propagation.
- :mod:`semlens.world` — built-in concept images and captioned clips; Broden / MSVD-style I/O.
- :mod:`semlens.models` — reference CNNs; the model registry and loader.
- :mod:`semlens.train` — the one trainer (pluggable steps, terms, callbacks), regularizers, ``fit_module``.
- :mod:`semlens.units` — naming units: Network Dissection.
- :mod:`semlens.captioning` — the video captioner (Dong et al. 2017), one module per stage: topics, frame
  features, model, training, naming (PDM), evaluation, and the pipeline chaining them.
- :mod:`semlens.correct` — feedback store, activation enhancement, correction propagation.
- :mod:`semlens.evaluate` — explanation-quality metrics and the method comparison.
- :mod:`semlens.report` — the HTML report.
"""

__version__ = "0.1.0"
