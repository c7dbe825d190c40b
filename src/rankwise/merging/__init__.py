"""merge: combine models through their weight matrices.

* :mod:`.matching` -- permutation matching (weight matching, activation matching): ``match``.
* :mod:`.barrier` -- the loss along the linear path between two models, BatchNorm statistics reset.
* :mod:`.merge` -- merging fine-tunes of one base (average, task arithmetic, TIES, OPCM), streamed.
* :mod:`.lock` -- function-preserving transforms of attention that make a model refuse to merge.
"""
