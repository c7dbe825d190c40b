"""rankwise.compress: data-aware low-rank compression of a model's linear layers.

* :mod:`.methods`  -- ``METHODS`` registry (svd, asvd, fwsvd, svd-llm, svd-llm-v2)
* :mod:`.budget`, :mod:`.allocate` -- ratio -> rank plan (``ALLOCATORS``)
* :mod:`.pipeline` -- calibration (one-shot / sequential) and layer replacement
* :mod:`.saving`   -- save / load / export-dense
* :mod:`.api`      -- ``rankwise.compress(...)`` and ``rankwise.load(...)``

The package itself is callable: ``rankwise.compress(model, ...)`` is :func:`.api.compress`, also
after ``import rankwise.compress`` has bound the subpackage to the attribute ``rankwise.compress``.
"""
from .._callable import make_callable

make_callable(__name__, "rankwise.compress.api:compress")
