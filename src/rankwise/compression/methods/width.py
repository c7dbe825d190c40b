"""``width``: remove attention heads and FFN channels, refit the layer that reads them (ZipLM, Minitron).

Importance comes from calibration statistics, through the structured OBS of
:mod:`rankwise.linalg.obs`: for the layer that reads a group of inputs (``o_proj`` for a head, its
``head_dim`` columns; ``down_proj`` for an FFN channel, one column), with input second moment
``H = X X^T``, removing the columns ``S`` costs ``dE = tr(W_S (H^-1)_SS^-1 W_S^T)`` of output error
``||(W - W') X||^2`` once the other columns are re-fitted; groups go greedily, cheapest first.

Weight update: the reader is re-fitted by least squares to the dense model's output,
``W'_K = argmin ||W X - W'_K X'_K||`` (:func:`rankwise.linalg.refit.refit_left` with the selection of the
kept columns ``K``, on the sequential engine's paired statistics: ``X`` the dense model's inputs,
``X'`` the pruned prefix's; the engine's held-out ridge choice applies). The engine runs the
data-flow sub-groups ``[o] -> [down]`` of every block in order, so each block is pruned on the
outputs of the already pruned blocks before it. Then :mod:`rankwise.models.pruning` shrinks the
writers (``q``/``k``/``v`` rows of the removed heads, ``gate``/``up`` rows of the removed channels)
and rewrites the config.

Grouped-query attention: heads go evenly across KV groups (``mode=even``: the same number of query
heads from each group, so ``heads / kv_heads`` stays an integer) or as whole KV groups (``groups``:
a KV head with all its query heads); ``auto`` lets the costs choose.

Widths: ``uniform`` (default: every block keeps the same heads and channels, so the config stays a
plain config) or ``per-block``. The split of the budget between heads and channels, and the
per-block widths, come from a dry one-shot pass on the dense model that measures each block's OBS
cost curve for heads and for channels, the output error weighted by the loss's sensitivity to each
output direction (the output Fisher diagonal ``D``: ``dE = tr(D W_S (H^-1)_SS^-1 W_S^T)``, a loss
increase, comparable across blocks; the same weights rank the groups in the sequential pass):
uniform widths take the head option (none, k heads per group, j whole groups) and channel count of
least total cost that remove ``R`` of the block weights;
per-block widths minimize the summed cost under the global budget (Lagrangian search over blocks).
Per-block widths cannot be written as a plain config.json; they export through HF remote code.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ...calibration.stats import COV, LayerStats
from ...errors import ConfigError
from ...linalg.obs import contiguous_groups, obs_remove
from ...linalg.refit import refit_columns
from ...models.pruning import BlockLayout, Widths, block_layout, block_states, check_config, is_causal_lm, \
    keep_columns, prune_channels, prune_heads, record_attributes, widths, write_widths
from ...models.surgery import block_prefix, decoder_blocks, linear_weight
from ...structures.columns import ColumnSubsetLinear
from ..pruning import PruneContext, PruneOutcome, PruningMethod, largest_ratio_text
from .base import STRUCTURES

PARTS = ("auto", "heads,channels", "heads", "channels")
WEIGHTINGS = ("fisher", "stream", "none")
MODES = ("auto", "even", "groups")


@dataclass
class WidthOptions:
    """``parts``: what to prune (auto = heads and channels where the config can express pruned heads,
    else channels); ``gqa``: auto | even | groups; ``widths``: uniform | per-block; ``multiple``: kept
    FFN channels are a multiple of it (32, GGUF's block: ``down_proj`` rows stay Q4_0/Q8_0-exportable
    and take quantization groups of 32); ``damping``: relative ridge of ``H`` in the OBS selection;
    ``refit``: ``readers`` (``o_proj``, ``down_proj``: ZipLM's update) or ``all`` (also every other
    linear layer of the block, its kept rows re-fitted to the dense model's output from the pruned
    prefix's inputs, which corrects the error the earlier blocks left); ``weighting``: how an output
    error is counted, ``fisher`` (each output direction weighted by the loss's sensitivity to it, the
    output Fisher diagonal measured on ``score_windows`` calibration windows: the costs are loss
    increases, comparable across blocks), ``stream`` (plain squared error divided by the energy of the
    residual stream it is added to; what encoders, which have no next-token loss, get) or ``none``
    (plain squared error)."""

    parts: str = "auto"
    gqa: str = "auto"
    widths: str = "uniform"
    multiple: int = 32
    damping: float = 0.01
    refit: str = "readers"
    weighting: str = "fisher"
    score_windows: int = 8

    def __post_init__(self) -> None:
        self.parts = ",".join(p.strip() for p in str(self.parts).split(",")) if self.parts else "auto"
        if self.parts == "channels,heads":
            self.parts = "heads,channels"
        if self.parts not in PARTS:
            raise ValueError(f"parts must be one of {', '.join(PARTS)}, got {self.parts!r}")
        if self.gqa not in MODES:
            raise ValueError(f"gqa must be one of {', '.join(MODES)}, got {self.gqa!r}")
        if self.widths not in ("uniform", "per-block"):
            raise ValueError(f"widths must be uniform or per-block, got {self.widths!r}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be a positive integer, got {self.multiple!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping > 0):
            raise ValueError(f"damping must be > 0, got {self.damping!r}")
        if self.refit not in ("readers", "all"):
            raise ValueError(f"refit must be readers or all, got {self.refit!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if isinstance(self.score_windows, bool) or not isinstance(self.score_windows, int) or self.score_windows < 1:
            raise ValueError(f"score_windows must be a positive integer, got {self.score_windows!r}")


@dataclass(frozen=True)
class HeadOption:
    """One way to prune a block's heads: ``mode`` (none / even / groups), ``units`` removed (heads for
    even, KV groups for groups), the resulting counts and the weights removed."""

    mode: str
    units: int
    heads: int
    kv_heads: int
    params: int

    @property
    def label(self) -> str:
        """``none``, ``-K heads (even)`` or ``-J KV groups``."""
        if self.mode == "none":
            return "none"
        return f"-{self.units} heads (even)" if self.mode == "even" else f"-{self.units} KV groups"


@dataclass
class Geometry:
    """What the budget arithmetic needs: the layout, one block's widths, the hidden size, the weights
    per block, per FFN channel and the head options the config accepts."""

    layout: BlockLayout
    widths: Widths
    hidden: int
    block_params: int
    per_channel: int
    head_options: list[HeadOption] = field(default_factory=list)
    parts: tuple[str, ...] = ()


@STRUCTURES.register("width")
class Width(PruningMethod):
    """Head and channel pruning with a least-squares refit (module docstring)."""

    name = "width"
    Options = WidthOptions

    def needs(self) -> set[str]:
        return {COV}

    def engine_defaults(self) -> dict[str, Any]:
        """Sub-groups with the refit at a fixed relative ridge of 1.0 (toward the kept columns of ``W``).
        The engine's held-out ridge choice is not the default here: on SmolLM2 at 20 % (reference text,
        full protocol) it chose small ridges (down to 1e-3) in some blocks for seed 5 and gave perplexity
        227.96, against 59.26 with 1.0 everywhere (BENCHMARKS.md, "structured pruning"); the squared
        error on 8 held-out windows is dominated by a few tokens with massive activations, and a small
        ridge that fits them better generalizes worse. ``--refit-ridge`` overrides it."""
        return {"granularity": "subgroup", "refit": True, "refit_ridge": 1.0}

    def plain_output(self) -> str | None:
        if self.options.widths == "per-block":
            return ("--set widths=per-block gives blocks of different widths, which a plain config.json cannot "
                    "express: keep the model in memory (Python API) or export it through HF remote code, whose "
                    "per-layer structure table holds per-block widths; for a plain directory use widths=uniform")
        return None

    # -- geometry and feasibility -------------------------------------------------------------------
    def geometry(self, model: nn.Module) -> Geometry:
        layout = block_layout(model)
        ws = widths(model, layout)
        if any(w != ws[0] for w in ws):
            raise ConfigError("the model's blocks already have different widths; width pruning starts from a model "
                              "with uniform blocks")
        w = ws[0]
        block = decoder_blocks(model)[0]
        hidden = int(linear_weight(block.get_submodule(layout.o)).shape[0])
        per_channel = (len(layout.mlp_in) + 1) * hidden
        names = [*layout.head_writers, layout.o, *layout.mlp_in, layout.mlp_out]
        block_params = sum(int(linear_weight(block.get_submodule(n)).numel()) for n in names)
        parts = self._parts(layout)
        geo = Geometry(layout, w, hidden, block_params, per_channel, parts=parts)
        if "heads" in parts:
            geo.head_options = self._head_options(model, geo)
        return geo

    def _parts(self, layout: BlockLayout) -> tuple[str, ...]:
        p = self.options.parts
        if p == "auto":
            return ("heads", "channels") if layout.qkv is None and layout.head_keys is not None else ("channels",)
        parts = tuple(p.split(","))
        if "heads" in parts and layout.head_keys is None:
            raise ConfigError(f"{layout.family}'s config fixes head_dim = hidden_size / num_heads, so it cannot "
                              "express pruned attention heads; prune FFN channels only with --set parts=channels")
        return parts

    def _head_options(self, model: nn.Module, geo: Geometry) -> list[HeadOption]:
        w, D, hd = geo.widths, geo.hidden, geo.widths.head_dim
        H, KV = w.heads, w.kv_heads
        r = H // KV
        opts = [HeadOption("none", 0, H, KV, 0)]
        modes = ("even", "groups") if self.options.gqa == "auto" else (self.options.gqa,)
        if "even" in modes:
            for k in range(1, r):
                opts.append(HeadOption("even", k * KV, H - k * KV, KV, k * KV * 2 * D * hd))
        if "groups" in modes:
            for j in range(1, KV):
                # j KV heads and their j r query heads: q and o lose j r heads, k and v lose j
                opts.append(HeadOption("groups", j, H - j * r, KV - j, j * (r + 1) * 2 * D * hd))
        if geo.layout.head_keys is None or self.options.widths == "per-block":
            return opts
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hk, kvk, hdk = geo.layout.head_keys
        valid = []
        for o in opts:
            try:
                check_config(cfg, **{hk: o.heads, kvk: o.kv_heads, hdk: hd})
            except ConfigError:
                continue
            valid.append(o)
        return valid

    def _channels_for(self, geo: Geometry, need: float) -> int | None:
        """FFN channels to remove for ``need`` more weights: the kept count rounded down to ``multiple``;
        ``None`` when not even ``multiple`` channels would stay."""
        F, mult = geo.widths.channels, self.options.multiple
        if need <= 0:
            return 0
        if "channels" not in geo.parts:
            return None
        c = math.ceil(need / geo.per_channel)
        kept = (F - c) // mult * mult
        return F - kept if kept >= min(mult, F) and kept >= 1 else None

    def _largest_ratio(self, geo: Geometry) -> float:
        heads = max((o.params for o in geo.head_options), default=0)
        F, mult = geo.widths.channels, self.options.multiple
        ch = (F - min(mult, F)) * geo.per_channel if "channels" in geo.parts else 0
        return (heads + ch) / geo.block_params

    def check(self, model: nn.Module, ratio: float) -> None:
        geo = self.geometry(model)
        largest = self._largest_ratio(geo)
        if ratio > largest + 1e-12:
            keep = []
            best = max(geo.head_options, key=lambda o: o.params, default=None)
            if best is not None and best.mode != "none":
                keep.append("one KV group" if best.mode == "groups" else "one query head per KV group")
            if "channels" in geo.parts:
                keep.append(f"{min(self.options.multiple, geo.widths.channels)} FFN channels")
            raise ConfigError(f"--ratio {ratio:g} would remove every head of a group or every channel: width pruning "
                              f"({'+'.join(geo.parts)}) keeps at least {' and '.join(keep)} per block; the largest "
                              f"feasible ratio is {largest_ratio_text(math.floor(largest * 1e4) / 1e4)}")

    # -- the per-layer fit (the engine calls it for o_proj and down_proj) ------------------------------
    def fit(self, W: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
            spec: Mapping[str, Any]) -> ColumnSubsetLinear:
        """Select the kept columns by structured OBS on ``(T, C')`` (``T = stats.target(W)``), then fit
        ``T`` on them under ``C'`` by least squares (the refit: ``min ||W X - W'_K X'_K||``).

        The engine fits each layer once per candidate ridge of its held-out choice and once more with the
        chosen one, all on the same input statistics: the selection is made at the first of these fits
        and reused by the others (only the least squares, cheap, depends on the ridge)."""
        T = stats.target(W).to(torch.float64)
        if spec["part"] == "rows":  # a layer that writes heads / channels: the refit of all its rows
            return ColumnSubsetLinear.from_weight(T.to(torch.float32), torch.arange(W.shape[1]), W.shape[1], bias,
                                                  dtype=torch.float32)
        H = stats.covariance().to(torch.float64)
        groups, classes, count = _units(spec, W.shape[1])
        cached = getattr(self, "_selection", None)
        if cached is not None and cached[0] is stats.inputs and cached[1] is spec:
            cols, removed = cached[2], cached[3]
        else:
            res = obs_remove(T, H, groups, count, classes=classes, damping=self.options.damping,
                             row_weights=spec.get("row_weights"))
            cols, removed = res.columns(groups), sorted(res.removed)
            self._selection = (stats.inputs, spec, cols, removed)
        W_K = refit_columns(T, cols, H, dtype=torch.float32)
        layer = ColumnSubsetLinear.from_weight(W_K, cols, W.shape[1], bias, dtype=torch.float32)
        layer.fit_info = {"note": f"removed {spec['part']} {removed}"}
        return layer

    # -- the pass ---------------------------------------------------------------------------------
    def prune(self, model: nn.Module, windows: torch.Tensor, ctx: PruneContext) -> PruneOutcome:
        from ..engine import Engine, ModelSource

        geo = self.geometry(model)
        layout, prefix = geo.layout, block_prefix(model)
        blocks = decoder_blocks(model)  # found now: once every linear is a fitted layer the search would fail
        N = len(blocks)
        names = {i: (f"{prefix}.{i}.{layout.o}", f"{prefix}.{i}.{layout.mlp_out}") for i in range(N)}
        originals = {n: model.get_submodule(n) for pair in names.values() for n in pair}
        self._weights = {}
        self._weighting = self.options.weighting
        if self._weighting == "fisher" and not is_causal_lm(model):  # no next-token loss to differentiate
            self._weighting = "stream"
        if self._weighting == "fisher":  # the dense model's output Fisher of every reader
            from ...calibration.gradients import output_fisher

            self._weights = output_fisher(model, windows[: self.options.score_windows], list(originals),
                                          batch_size=1, progress=ctx.progress)
        choices, costs, table = self._allocate(model, windows, geo, ctx, names, originals)
        plan: dict[str, dict | None] = {}
        rows = []
        if self.options.refit == "all":
            rows = [f"{prefix}.{i}.{n}" for i in range(N) for n in (*layout.head_writers, *layout.mlp_in)]
            plan.update({n: {"part": "rows"} for n in rows})
            originals = {**{n: model.get_submodule(n) for n in rows}, **originals}
            order = {n: j for j, (n, _) in enumerate(model.named_modules())}
            originals = dict(sorted(originals.items(), key=lambda kv: order[kv[0]]))
        for i, (h, c) in enumerate(choices):
            o, down = names[i]
            plan[o] = None if h.mode == "none" else {
                "part": "heads", "mode": h.mode, "remove": h.units, "head_dim": geo.widths.head_dim,
                "heads": geo.widths.heads, "kv_heads": geo.widths.kv_heads, "row_weights": self._weights.get(o)}
            plan[down] = None if c == 0 else {"part": "channels", "remove": c, "row_weights": self._weights.get(down)}
        opts = ctx.engine
        fitted: dict[str, Any] = {}

        def fit(items):
            layers = self.fit_unit(items)
            for layer in layers.values():
                for t in layer.state_dict().values():
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        from ...errors import NumericalError
                        raise NumericalError("the width refit produced non-finite weights; try --refit-ridge 0.1")
            return layers

        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        Engine(ModelSource(model, ctx.device), originals, plan, lambda items: _cast(fit(items), dtype), opts,
               need_cov=True, progress=ctx.progress,
               on_replace=lambda n, layer, ridge: fitted.__setitem__(n, (layer, ridge))).run(windows)
        for n in rows:  # refitted layers back to their own type, all rows (the surgery slices them below)
            if n in fitted:
                blk, rel = n[len(prefix) + 1:].split(".", 1)
                layer = fitted[n][0]
                keep_columns(blocks[int(blk)], rel, layer.index, layer.weight_k.detach(),
                             like=originals[n])
        record_blocks = []
        for i, block in enumerate(blocks):
            o, down = names[i]
            entry: dict[str, Any] = {"block": i, "head_option": choices[i][0].label,
                                     "channels_removed": choices[i][1], "cost": costs[i]}
            geom = geo.widths
            if o in fitted:
                layer = fitted[o][0]
                hd = geom.head_dim
                heads = sorted({int(c) // hd for c in layer.index.tolist()})
                new = prune_heads(block, layout, geom, heads, layer.weight_k.detach(), like=originals[o])
                entry.update(kept_heads=heads, kept_kv_heads=sorted({h // (geom.heads // geom.kv_heads)
                                                                      for h in heads}), ridge_o=fitted[o][1])
                geom = new
            else:
                entry.update(kept_heads=list(range(geom.heads)), kept_kv_heads=list(range(geom.kv_heads)))
            if down in fitted:
                layer = fitted[down][0]
                chans = layer.index.tolist()
                prune_channels(block, layout, chans, layer.weight_k.detach(), like=originals[down])
                entry.update(kept_channels=chans, ridge_down=fitted[down][1])
            else:
                entry.update(kept_channels=list(range(geom.channels)))
            record_blocks.append(entry)
        if self.options.widths == "uniform":
            write_widths(model, layout)
        else:
            record_attributes(model, layout)
        record = {"structure": "width", "parts": list(geo.parts), "widths": self.options.widths,
                  "gqa": self.options.gqa, "multiple": self.options.multiple, "refit": self.options.refit,
                  "weighting": self._weighting,
                  "before": dataclasses.asdict(geo.widths),
                  "after": [dataclasses.asdict(w) for w in widths(model, layout)] if self.options.widths == "per-block"
                  else dataclasses.asdict(widths(model, layout)[0]),
                  "options_table": table, "blocks": record_blocks,
                  "why": "heads and channels removed greedily by structured-OBS cost (the output error of the layer "
                         "that reads them after its least-squares refit); the head/channel split "
                         + ("chosen by the least total cost over the blocks" if self.options.widths == "uniform"
                            else "and per-block widths chosen by the least total cost under the global budget")}
        label = f"{'+'.join(geo.parts)}, {self.options.widths}"
        return PruneOutcome(record, {}, label=label, granularity=opts.granularity, refit=bool(opts.refit))

    # -- allocation ---------------------------------------------------------------------------------
    def _allocate(self, model, windows, geo: Geometry, ctx: PruneContext, names, originals):
        """``([(head option, channels removed)] per block, [cost per block], table of the options)``."""
        N = len(names)
        target = ctx.ratio * geo.block_params
        head_opts = geo.head_options or [HeadOption("none", 0, geo.widths.heads, geo.widths.kv_heads, 0)]
        feasible = [(h, self._channels_for(geo, target - h.params)) for h in head_opts]
        feasible = [(h, c) for h, c in feasible if c is not None]
        if not feasible:  # check() names the largest feasible ratio; this is a head-only budget overshoot
            raise ConfigError(f"--ratio {ctx.ratio:g} cannot be met with parts {'+'.join(geo.parts)}; choose a ratio "
                              f"up to {largest_ratio_text(self._largest_ratio(geo))}")
        per_block = self.options.widths == "per-block"
        if len(feasible) == 1 and not per_block:
            h, c = feasible[0]
            return [(h, c)] * N, [None] * N, [{"option": h.label, "channels_removed": c, "cost": None}]
        curves = self._curves(model, windows, geo, ctx, names, originals, head_opts, feasible, per_block)
        if not per_block:
            table = []
            for h, c in feasible:
                cost = sum(curves[i]["heads"][h.label] + _at(curves[i]["channels"], c) for i in range(N))
                table.append({"option": h.label, "heads": h.heads, "kv_heads": h.kv_heads, "channels_removed": c,
                              "cost": cost})
            best = min(range(len(feasible)), key=lambda j: table[j]["cost"])
            h, c = feasible[best]
            return [(h, c)] * N, [curves[i]["heads"][h.label] + _at(curves[i]["channels"], c) for i in range(N)], table
        return self._per_block(geo, curves, head_opts, target * N)

    def _curves(self, model, windows, geo, ctx, names, originals, head_opts, feasible, per_block) -> list[dict]:
        """Per block: ``{"heads": {option label: cost}, "channels": [cumulative cost after c removals]}``,
        measured on the dense model (a dry one-shot pass of the engine)."""
        from ..engine import Engine, ModelSource

        F, mult = geo.widths.channels, self.options.multiple
        c_max = max(c for _, c in feasible)
        if per_block:
            c_max = F - min(mult, F) if "channels" in geo.parts else 0
        curves: list[dict] = [{"heads": {"none": 0.0}, "channels": [0.0]} for _ in names]
        index = {n: (i, k) for i, pair in names.items() for k, n in enumerate(pair)}
        modes = sorted({h.mode for h in head_opts if h.mode != "none"})

        def probe(items):
            for n, x in items.items():
                i, k = index[n]
                H = x.stats.covariance().to(torch.float64)
                W = x.W.to(torch.float64)
                if k == 0:
                    for mode in modes:
                        spec = {"part": "heads", "mode": mode, "head_dim": geo.widths.head_dim,
                                "heads": geo.widths.heads, "kv_heads": geo.widths.kv_heads}
                        most = max(h.units for h in head_opts if h.mode == mode)
                        groups, classes, _ = _units({**spec, "remove": most}, W.shape[1])
                        res = obs_remove(W, H, groups, most, classes=classes, damping=self.options.damping,
                                         row_weights=self._weights.get(n))
                        for h in head_opts:
                            if h.mode == mode:
                                curves[i]["heads"][h.label] = res.costs[h.units - 1]
                elif c_max > 0:
                    groups = contiguous_groups(W.shape[1], 1)
                    res = obs_remove(W, H, groups, c_max, damping=self.options.damping,
                                     row_weights=self._weights.get(n))
                    curves[i]["channels"] = [0.0] + res.costs
            return {}

        plan = {}
        for i, (o, down) in names.items():
            plan[o] = {} if modes else None
            plan[down] = {} if c_max > 0 else None
        dry = dataclasses.replace(ctx.engine, mode="one-shot", granularity="block", refit=False)
        Engine(ModelSource(model, ctx.device), originals, plan, probe, dry, need_cov=True, progress=ctx.progress,
               dry=True).run(windows)
        if self._weighting == "stream":  # errors relative to the stream they are added to
            energy = stream_energy(model, windows[:STREAM_WINDOWS], ctx.engine.batch_size)
            n_tok = windows.shape[0] * windows.shape[1]
            for i, cv in enumerate(curves):
                scale = 1.0 / (n_tok * energy[i])
                cv["heads"] = {k: v * scale for k, v in cv["heads"].items()}
                cv["channels"] = [v * scale for v in cv["channels"]]
                cv["stream_energy"] = energy[i]
        return curves

    def _per_block(self, geo: Geometry, curves, head_opts, budget: float):
        """Per-block (head option, channels) minimizing the summed cost with at least ``budget`` weights
        removed: each block takes ``argmin cost - lam * params`` and ``lam`` is bisected."""
        F, mult = geo.widths.channels, self.options.multiple
        steps = list(range(0, F - min(mult, F) + 1, 1))
        chan_opts = sorted({c for c in steps if (F - c) % mult == 0 or c == 0}) if "channels" in geo.parts else [0]

        def choose(lam: float):
            picks, removed = [], 0.0
            for cv in curves:
                best = None
                for h in head_opts:
                    hc = cv["heads"].get(h.label)
                    if hc is None:
                        continue
                    for c in chan_opts:
                        if c >= len(cv["channels"]):
                            break
                        p = h.params + c * geo.per_channel
                        val = hc + cv["channels"][c] - lam * p
                        if best is None or val < best[0]:
                            best = (val, h, c, hc + cv["channels"][c], p)
                picks.append(best)
                removed += best[4]
            return picks, removed

        lo, hi = 0.0, 1.0
        while choose(hi)[1] < budget:
            hi *= 4.0
            if hi > 1e30:
                raise ConfigError("per-block widths cannot reach the budget; lower --ratio")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if choose(mid)[1] >= budget:
                hi = mid
            else:
                lo = mid
        picks, _ = choose(hi)
        table = [{"block": i, "option": p[1].label, "channels_removed": p[2], "cost": p[3]} for i, p in enumerate(picks)]
        return [(p[1], p[2]) for p in picks], [p[3] for p in picks], table


#: Calibration windows that measure the residual stream's energy per block (:func:`stream_energy`).
STREAM_WINDOWS = 8


@torch.no_grad()
def stream_energy(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[float]:
    """``mean_t ||x_t||^2`` of the residual stream entering each block, over ``windows``."""
    device = next(model.parameters()).device
    sums, count = None, 0
    for s in range(0, windows.shape[0], batch_size):
        states = block_states(model, windows[s: s + batch_size].to(device))[:-1]
        e = torch.stack([x.double().square().sum() for x in states])
        sums = e if sums is None else sums + e
        count += int(states[0].shape[0] * states[0].shape[1])
    return (sums / count).tolist()


def _at(curve: list[float], c: int) -> float:
    """The cumulative cost after ``c`` removals (curves measured with several removals per step are
    read at the nearest measured count at or above ``c``)."""
    return curve[min(c, len(curve) - 1)]


def _units(spec: Mapping[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(column groups, balance classes, count)`` of a layer's plan (see :func:`obs_remove`)."""
    if spec["part"] == "channels":
        return contiguous_groups(n, 1), None, int(spec["remove"])
    hd, H, KV = int(spec["head_dim"]), int(spec["heads"]), int(spec["kv_heads"])
    r = H // KV
    if spec["mode"] == "even":
        return contiguous_groups(n, hd), torch.arange(H) // r, int(spec["remove"])
    return contiguous_groups(n, r * hd), None, int(spec["remove"])


def _cast(layers: dict, dtype: torch.dtype) -> dict:
    for layer in layers.values():
        layer.cast_(dtype)
    return layers
