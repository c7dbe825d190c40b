"""Adapter initializations: the ``INITS`` registry, one module per init family (see :mod:`.base`).

* :mod:`.lora` -- lora
* :mod:`.spectral` -- pissa, milora, olora (from the SVD / QR of ``W``)
* :mod:`.nlora` -- nlora, nlora-inttune (Nystrom)
* :mod:`.loldu` -- loldu; :mod:`.salt` -- salt; :mod:`.singlora` -- singlora
* :mod:`.eva` -- eva (activations), with :func:`eva_eigen`, :func:`eva_ranks`
* :mod:`.gradient` -- lora-ga, lora-sb (gradients)
* :mod:`.quantized` -- lq-lora, loftq (a frozen quantized base)

Each init has its own ``Options`` dataclass (``INITS[name].Options``); :meth:`InitSpec.build_options`
builds it and rejects an option the init does not take.
"""
from .base import INITS, InitContext, InitSpec, NoOptions, get_init, kaiming_uniform, register
from .eva import eva_eigen, eva_ranks

__all__ = ["INITS", "InitContext", "InitSpec", "NoOptions", "eva_eigen", "eva_ranks", "get_init",
           "kaiming_uniform", "register"]
