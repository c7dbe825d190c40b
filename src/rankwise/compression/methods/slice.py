"""``slice``: SliceGPT with one global rotation -- delete the least used directions of the residual
stream, so ``hidden_size`` shrinks and the model stays a plain model of its family.

1. Fold every stream norm's gain into the linears that read it (:func:`rankwise.models.stream.fold_norms`,
   exact; a tied LM head whose final-norm gain is not a constant is untied, which adds ``vocab x d'``
   stored values: recorded as ``untied_params``).
2. Calibrate: the readers of the stream see ``n(x) = x / rms(x)`` (the folded norms' outputs). Their
   second moments at every site (each block's two pre-norms and the final norm), summed,
   ``C = sum_sites sum_t n(x_t) n(x_t)^T``, weigh every site and token equally (``||n(x)||^2 = d``).
3. ``Q`` = the ``d'`` leading eigenvectors of ``C`` (PCA), and the stream is rotated and sliced:
   ``E <- E Q``, readers ``W <- W Q``, writers ``W <- Q^T W`` (:func:`rankwise.models.stream.rotate_stream`,
   which also sets each norm's gain to ``sqrt(d / d')``: an RMS over ``d'`` entries).

``--ratio R``: every targeted weight reads or writes the stream along one side, so each shrinks by
``d' / d``: ``d' ~ (1 - R) d``, rounded to the nearest width the config accepts (Llama needs
``hidden_size % num_attention_heads == 0``: a multiple of 9 for SmolLM2). The record keeps the
eigenvalues and the fraction of each site's energy kept.

One global rotation keeps the architecture plain. SliceGPT's per-block rotations (a ``Q_l`` per
block) are more accurate but need a ``Q_l^T Q_(l+1)`` matrix on every residual connection, which no
plain config can express; they are left out (see BENCHMARKS.md, issue 20). LayerNorm models whose
attention width is tied to the hidden size (GPT-2) and post-norm encoders (BERT) cannot be sliced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...calibration.stats import COV, collect_input_stats
from ...errors import ConfigError, UnsupportedArchitectureError
from ...models.pruning import check_config
from ...models.stream import fold_norms, rotate_stream, stream_layout
from ..pruning import PruneContext, PruneOutcome, PruningMethod
from .base import STRUCTURES


@dataclass
class SliceOptions:
    """``multiple``: the kept hidden size is a multiple of it (besides what the config requires)."""

    multiple: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be a positive integer, got {self.multiple!r}")


def _text_config(model: nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


@STRUCTURES.register("slice")
class Slice(PruningMethod):
    """SliceGPT, one global rotation (module docstring)."""

    name = "slice"
    Options = SliceOptions

    def needs(self) -> set[str]:
        return {COV}

    def layout(self, model: nn.Module):
        try:
            layout = stream_layout(model)
        except UnsupportedArchitectureError as e:
            raise ConfigError(f"--structure slice rotates and slices the residual stream, which {type(model).__name__} "
                              f"does not allow ({str(e).split('; compress without')[0]}); use --structure width or "
                              "depth") from None
        if layout.family == "gpt2":
            raise ConfigError("--structure slice cannot shrink GPT-2's stream: its attention width is its hidden size "
                              "(config n_embd), which plain GPT-2 cannot decouple; use --structure width or depth")
        return layout

    def width(self, model: nn.Module, d: int, ratio: float) -> int:
        """The kept hidden size: the width the config accepts whose removed fraction ``1 - d'/d`` is
        closest to ``ratio`` (ties: the smaller width); :class:`ConfigError` naming the largest feasible
        ratio when none below ``d`` is accepted."""
        cfg = _text_config(model)
        heads = getattr(cfg, "num_attention_heads", None)
        valid = []
        pin = {"head_dim": d // int(heads)} if getattr(cfg, "head_dim", None) is None and heads else {}
        for k in range(self.options.multiple, d, self.options.multiple):
            try:
                check_config(cfg, hidden_size=k, **pin)
            except ConfigError:
                continue
            valid.append(k)
        if not valid:
            raise ConfigError(f"no hidden size below {d} fits {type(cfg).__name__} with multiple "
                              f"{self.options.multiple}; use --structure width or depth")
        target = (1.0 - ratio) * d
        best = min(valid, key=lambda k: (abs(k - target), k))
        if best == valid[0] and target < valid[0] - (valid[1] - valid[0] if len(valid) > 1 else 1) / 2:
            largest = 1.0 - valid[0] / d
            raise ConfigError(f"--ratio {ratio:g} would slice the stream to {target:.0f} of {d} dimensions; the "
                              f"smallest width {type(cfg).__name__} accepts is {valid[0]}: the largest feasible "
                              f"ratio is {largest:.4f}".rstrip("0"))
        return best

    def check(self, model: nn.Module, ratio: float) -> None:
        layout = self.layout(model)
        self.width(model, layout.hidden, ratio)

    @torch.no_grad()
    def prune(self, model: nn.Module, windows: torch.Tensor, ctx: PruneContext) -> PruneOutcome:
        layout = self.layout(model)
        d = layout.hidden
        k = self.width(model, d, ctx.ratio)
        info = fold_norms(model, layout)
        sites = [s.readers[0] for b in layout.blocks for s in b] + ([layout.head] if layout.head else [])
        stats = collect_input_stats(model, windows, sites, batch_size=ctx.engine.batch_size, progress=ctx.progress)
        C = sum(stats[s].cov for s in sites)
        C = 0.5 * (C + C.T)
        evals, evecs = torch.linalg.eigh(C)
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order], evecs[:, order]
        Q = evecs[:, :k].contiguous()
        kept = {s: float(torch.trace(Q.T @ stats[s].cov @ Q) / torch.trace(stats[s].cov)) for s in sites}
        del stats
        rotate_stream(model, Q, layout)
        check_config(_text_config(model))
        untied = int(model.get_submodule(layout.head).weight.numel()) if info.untied else 0
        total = float(evals.clamp_min(0).sum())
        record = {"structure": "slice", "rotation": "global (one PCA of the normalized stream at every norm)",
                  "hidden_before": d, "hidden_after": k, "untied_head": info.untied,
                  "untied_params": untied, "notes": info.notes,
                  "energy_kept": float(evals[:k].clamp_min(0).sum()) / total if total > 0 else 1.0,
                  "energy_kept_per_site": kept, "eigenvalues": [float(e) / total for e in evals.tolist()],
                  "why": f"the {d - k} directions of least calibration energy of the normalized residual stream "
                         "were deleted"}
        return PruneOutcome(record, {}, label="slicegpt-global")
