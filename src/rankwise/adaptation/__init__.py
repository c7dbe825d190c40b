"""rankwise.adapt: low-rank adapters initialized from the spectrum, activations or gradients.

* :mod:`.inits`  -- ``INITS`` registry (lora, pissa, milora, olora, eva, lora-ga, lora-sb, nlora,
  nlora-inttune, loldu, salt, singlora; on a quantized base: lq-lora, loftq), one module per init
  family, each init with its formula and its typed ``Options``
* :mod:`.layers` -- the adapter modules (``y = base(x) + Delta W x``)
* :mod:`.attach` -- ``adapt(model, init, rank, ...)``, merge / unmerge
* :mod:`.train`  -- the training loop
* :mod:`.saving` -- PEFT export, rankwise format, merged checkpoint

>>> rankwise.adapt(model, init="pissa", rank=16)

The package itself is callable (``rankwise.adapt(...)`` is :func:`.attach.adapt`), also after
``import rankwise.adapt`` has bound the subpackage to the attribute ``rankwise.adapt``.
"""
from .attach import adapt, count_trainable, merge, merge_and_unload, trainable_parameters, unmerge
from .inits import INITS, get_init
from .layers import adapter_layers
from .saving import load_rankwise, save_merged, save_peft, save_rankwise
from .train import TrainConfig, TrainResult, train

__all__ = ["INITS", "TrainConfig", "TrainResult", "adapt", "adapter_layers", "count_trainable", "get_init",
           "load_rankwise", "merge", "merge_and_unload", "save_merged", "save_peft", "save_rankwise",
           "train", "trainable_parameters", "unmerge"]

