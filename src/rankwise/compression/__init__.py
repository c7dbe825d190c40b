"""Compression: replace dense linear layers by fitted structures under one global budget.

The verb is :func:`rankwise.compress`; see :mod:`.pipeline`, :mod:`.methods`, :mod:`.saving`.
"""
