"""rankwise.analyze: per-layer spectral diagnostics.

``run.analyze`` (also ``rankwise.analyze``) drives the metric registry in ``metrics``:
``powerlaw`` (WeightWatcher-compatible alpha), ``farms`` (aspect-ratio-free alpha),
``intruders`` (base vs tuned), with the plain and whitened spectra from ``linalg.spectrum``;
``parallel`` runs the layers on the worker threads (one BLAS thread each); ``report`` renders
the HTML/PNG report.
"""

