"""Compression: replace dense linear layers by fitted structures under one global budget.

The verb is :func:`rankwise.compress` (a copying wrapper of :func:`.compress.compress`).

* :mod:`.compress`   -- the flow: config, calibration, plan, engine, report; low-memory variant
* :mod:`.engine`     -- the one block-sequential engine (in memory or streamed from disk)
* :mod:`.methods`    -- the structures' fitters (``STRUCTURES`` registry, one module per method)
* :mod:`.allocation` -- budgets and allocators (``ALLOCATORS`` registry)
* :mod:`.report`, :mod:`.saving`, :mod:`.rankplot` -- what a run reports and writes
"""
