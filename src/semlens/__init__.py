"""semlens: make deep neural networks readable.

Library layout (one home per concept):

- :mod:`semlens.layers` — dotted-name lookup, scoped activation capture/patching, state freezing.
- :mod:`semlens.explain` — gradients, sensitivity analysis and layer-wise relevance propagation.
- :mod:`semlens.world` — built-in concept images and captioned clips; Broden / MSVD-style I/O.
- :mod:`semlens.models` — reference CNNs and the captioner; the model registry.
- :mod:`semlens.train` — trainer, regularizers, interpretive (topic) loss.
- :mod:`semlens.units` — naming units: Network Dissection, topics and prediction-difference maximization.
- :mod:`semlens.correct` — feedback store, activation enhancement, correction propagation.
- :mod:`semlens.evaluate` — explanation-quality and captioning metrics.
- :mod:`semlens.report` — the HTML report.
"""

__version__ = "0.1.0"
