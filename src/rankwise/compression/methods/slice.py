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

With ``--refit`` the stream is first rotated exactly (all ``d`` directions) and the sequential engine
re-fits every reader on the kept directions and every writer's kept rows to the dense model's output
(:meth:`Slice._refit`) before the cut; off by default (measured no better, see ``engine_defaults``).

One global rotation keeps the architecture plain. SliceGPT's per-block rotations (a ``Q_l`` per
block) are more accurate but need a ``Q_l^T Q_(l+1)`` matrix on every residual connection, which no
plain config can express; they are left out (see BENCHMARKS.md, issue 20). LayerNorm models whose
attention width is tied to the hidden size (GPT-2) and post-norm encoders (BERT) cannot be sliced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from typing import Any, Mapping

from ...calibration.stats import COV, LayerStats, collect_input_stats
from ...errors import ConfigError, UnsupportedArchitectureError
from ...models.pruning import check_config
from ...linalg.refit import refit_columns
from ...models.stream import fold_norms, rotate_stream, stream_layout
from ...models.surgery import set_module
from ...structures.columns import ColumnSubsetLinear
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

    def engine_defaults(self) -> dict[str, Any]:
        """No refit by default: on SmolLM2 (8 x 256 calibration windows, 20 %) it did not lower the
        perplexity (110.6 with, 109.0 without) and costs an engine pass; ``--refit`` turns it on."""
        return {"granularity": "subgroup", "refit": False}

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
        refit = bool(ctx.engine.refit)
        if refit:  # rotate exactly, refit every block's readers and writers on the kept directions, then cut
            rotate_stream(model, evecs.contiguous(), layout)
            self._refit(model, layout, k, windows, ctx)
            Q = torch.eye(d, dtype=torch.float64)[:, :k]
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
        return PruneOutcome(record, {}, label="slicegpt-global" + ("+refit" if refit else ""),
                            granularity=ctx.engine.granularity if refit else "-", refit=refit)

    # -- the refit: the engine's sequential pass on the rotated model with the cut directions zeroed ------
    def _refit(self, model: nn.Module, layout, k: int, windows: torch.Tensor, ctx: PruneContext) -> None:
        """On the exactly rotated model, the stream's last ``d - k`` coordinates are the directions to
        delete. Zeroing them in the embeddings, in every reader's input (``ColumnSubsetLinear`` on the
        first ``k`` columns) and in every writer's output gives a model that computes exactly what the
        sliced model will (a norm over ``d`` entries with ``d - k`` zeros is the norm over ``k`` entries
        times ``sqrt(k / d)``, which :func:`rotate_stream`'s ``sqrt(d / k)`` gain undoes). Each reader
        and writer is re-fitted on the sequential engine to the output of the model whose embeddings
        alone are cut: ``min ||W X - W' X'||`` on the kept inputs (readers) or kept output rows (writers)."""
        from ..engine import Engine, ModelSource

        for name in layout.embeddings:
            emb = model.get_submodule(name)
            emb.weight.data[:, k:] = 0.0
        plan = {}
        for blk in layout.blocks:
            for sub in blk:
                plan.update({r: {"part": "read", "keep": k} for r in sub.readers})
                plan.update({w: {"part": "write", "keep": k} for w in sub.writers})
        modules = {n: model.get_submodule(n) for n in plan}
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

        def fit(items):
            layers = self.fit_unit(items)
            for layer in layers.values():
                layer.cast_(dtype)
            return layers

        Engine(ModelSource(model, ctx.device), modules, plan, fit, ctx.engine, need_cov=True,
               progress=ctx.progress).run(windows)
        for name in plan:
            layer = model.get_submodule(name)
            set_module(model, name, layer.to_linear())

    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> ColumnSubsetLinear:
        """A reader keeps its first ``keep`` input columns, fitted by least squares to ``stats.target(W)``;
        a writer keeps its first ``keep`` output rows of ``stats.target(W)`` (the others write the cut
        directions: zero)."""
        T = stats.target(W).to(torch.float64)
        k = int(spec["keep"])
        if spec["part"] == "read":
            cols = torch.arange(k)
            return ColumnSubsetLinear.from_weight(refit_columns(T, cols, stats.covariance()), cols, W.shape[1], bias,
                                                  dtype=torch.float32)
        T[k:] = 0.0
        b = None if bias is None else torch.cat([bias[:k], bias.new_zeros(bias.shape[0] - k)])
        return ColumnSubsetLinear.from_weight(T.to(torch.float32), torch.arange(W.shape[1]), W.shape[1], b,
                                              dtype=torch.float32)
