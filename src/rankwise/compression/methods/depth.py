"""``depth``: remove whole blocks (Shortened LLaMA, ShortGPT, Gromov et al.).

``--ratio R`` removes ``n = round(R N)`` of the ``N`` blocks (every block holds the same targeted
weights, so ``n / N`` of them), ranked on the first ``score_windows`` calibration windows by
``criterion``:

* ``ppl`` (Shortened LLaMA's PPL criterion): ``s_i = exp(mean NLL)`` of the model with block ``i``
  alone removed; the ``n`` blocks whose removal hurts least go (one shot).
* ``taylor+`` (Shortened LLaMA's Taylor+): ``s_i = sum_{W in block i} sum |W . g_W|``,
  ``g_W = sum_b dL_b/dW`` (the first-order change of the loss when the block's weights are zeroed),
  the ``n`` lowest go; "+": the first 4 and the last 2 blocks are never removed (``protect_first`` /
  ``protect_last``).
* ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the ``n``
  consecutive blocks ``l .. l+n-1`` whose input and output are closest,
  ``d(l, n) = mean_t arccos(cos(x_t^(l), x_t^(l+n))) / pi`` over every token ``t`` of the windows (the
  paper reads the last token only), ``l* = argmin_l d(l, n)``.

``ppl`` and ``taylor+`` read next-token losses and need a causal LM; ``angular`` also works on encoders.
The config's ``num_hidden_layers`` and every per-layer list in it (``layer_types``, ...) are rewritten.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ...calibration.gradients import accumulate_gradients, lm_loss
from ...errors import ConfigError
from ...models.pruning import block_states, drop_blocks, is_causal_lm, skipping
from ...models.surgery import block_prefix, decoder_blocks, find_linears, linear_weight
from ..pruning import PruneContext, PruneOutcome, PruningMethod, largest_ratio_text
from .base import STRUCTURES

CRITERIA = ("ppl", "taylor+", "angular")
#: Taylor+'s blocks never removed: the first 4 and the last 2 (Shortened LLaMA's "+" heuristic).
TAYLOR_PLUS_PROTECT = (4, 2)


@dataclass
class DepthOptions:
    """``criterion``: ppl | taylor+ | angular; ``score_windows``: calibration windows the scores read;
    ``protect_first`` / ``protect_last``: blocks never removed at each end (default: 4 / 2 for taylor+,
    0 / 0 otherwise)."""

    criterion: str = "ppl"
    score_windows: int = 8
    protect_first: int | None = None
    protect_last: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if isinstance(self.score_windows, bool) or not isinstance(self.score_windows, int) or self.score_windows < 1:
            raise ValueError(f"score_windows must be a positive integer, got {self.score_windows!r}")
        for key in ("protect_first", "protect_last"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{key} must be an integer >= 0, got {v!r}")

    def protected(self) -> tuple[int, int]:
        first, last = TAYLOR_PLUS_PROTECT if self.criterion == "taylor+" else (0, 0)
        return (first if self.protect_first is None else self.protect_first,
                last if self.protect_last is None else self.protect_last)


@STRUCTURES.register("depth")
class Depth(PruningMethod):
    """Block removal (module docstring)."""

    name = "depth"
    Options = DepthOptions

    def count(self, n_blocks: int, ratio: float) -> int:
        """Blocks removed at ``ratio``: ``max(1, round(ratio * N))``; :class:`ConfigError` naming the
        largest feasible ratio when that leaves no block or eats a protected one."""
        first, last = self.options.protected()
        removable = max(0, n_blocks - first - last) if (first or last) else n_blocks - 1
        n = max(1, round(ratio * n_blocks))
        if n > removable:
            if removable < 1:
                raise ConfigError(f"depth with criterion {self.options.criterion} protects the first {first} and last "
                                  f"{last} of the {n_blocks} blocks: none can be removed; lower protect_first / "
                                  "protect_last (--set protect_first=0) or use criterion ppl or angular")
            raise ConfigError(f"--ratio {ratio:g} removes {n} of the {n_blocks} blocks, but at most {removable} can go "
                              f"({'every block' if removable == n_blocks - 1 else 'the protected ones stay'}); the "
                              f"largest feasible ratio is {largest_ratio_text(removable / n_blocks)}")
        return n

    def check(self, model: nn.Module, ratio: float) -> None:
        self.count(len(decoder_blocks(model)), ratio)
        if self.options.criterion != "angular" and not is_causal_lm(model):
            raise ConfigError(f"depth criterion {self.options.criterion} scores next-token losses, which "
                              f"{type(model).__name__} does not predict; use --set criterion=angular")

    # -- scores ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _ppl(self, model: nn.Module, windows: torch.Tensor, candidates: list[int], ctx: PruneContext) -> dict:
        device = next(model.parameters()).device
        bs = ctx.engine.batch_size

        def nll() -> float:
            total, count = 0.0, 0
            for s in range(0, windows.shape[0], bs):
                batch = windows[s: s + bs].to(device)
                total += float(lm_loss(model, batch)) * batch.shape[0]
                count += batch.shape[0]
            return total / count

        scores = {}
        for i in tqdm(candidates, desc="depth ppl", disable=not ctx.progress, leave=False):
            with skipping(model, [i]):
                scores[i] = math.exp(nll())
        return scores

    def _taylor(self, model: nn.Module, windows: torch.Tensor, candidates: list[int], ctx: PruneContext) -> dict:
        prefix = block_prefix(model)
        linears = find_linears(model)
        grads = accumulate_gradients(model, windows, list(linears), batch_size=ctx.engine.batch_size,
                                     progress=ctx.progress)
        scores = {i: 0.0 for i in candidates}
        for name, g in grads.items():
            i = int(name[len(prefix) + 1:].split(".", 1)[0])
            if i in scores:
                W = linear_weight(linears[name]).detach().to(torch.float64)
                scores[i] += float((W * g).abs().sum())
        return scores

    @torch.no_grad()
    def _angular(self, model: nn.Module, windows: torch.Tensor, n: int, ctx: PruneContext) -> dict:
        device = next(model.parameters()).device
        sums: torch.Tensor | None = None
        tokens = 0
        for s in range(0, windows.shape[0], ctx.engine.batch_size):
            states = block_states(model, windows[s: s + ctx.engine.batch_size].to(device))
            starts = len(states) - n
            d = torch.empty(starts, dtype=torch.float64)
            for l in range(starts):
                a, b = states[l].to(torch.float64), states[l + n].to(torch.float64)
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
                d[l] = torch.arccos(cos).sum() / math.pi
            sums = d if sums is None else sums + d
            tokens += int(states[0].shape[0] * states[0].shape[1])
        return {l: float(v) / tokens for l, v in enumerate(sums.tolist())}

    # -- the pass -------------------------------------------------------------------------------
    def prune(self, model: nn.Module, windows: torch.Tensor, ctx: PruneContext) -> PruneOutcome:
        opts = self.options
        N = len(decoder_blocks(model))
        n = self.count(N, ctx.ratio)
        first, last = opts.protected()
        candidates = [i for i in range(N) if first <= i < N - last]
        win = windows[: opts.score_windows]
        if opts.criterion == "angular":
            scores = self._angular(model, win, n, ctx)
            allowed = {l: v for l, v in scores.items() if l >= first and l + n <= N - last}
            start = min(allowed, key=allowed.get)
            drop = list(range(start, start + n))
            why = f"the {n} consecutive blocks from {start} change the hidden states least (angular distance)"
        else:
            scores = (self._ppl if opts.criterion == "ppl" else self._taylor)(model, win, candidates, ctx)
            drop = sorted(sorted(scores, key=scores.get)[:n])
            why = {"ppl": "perplexity with the block alone removed is lowest",
                   "taylor+": "first-order loss change sum |W . dL/dW| is lowest"}[opts.criterion]
        prefix = block_prefix(model)
        before = list(find_linears(model))
        kept = drop_blocks(model, drop)
        renames = renamed(before, prefix, kept)
        record = {"structure": "depth", "criterion": opts.criterion, "blocks_before": N, "blocks_after": len(kept),
                  "removed_blocks": drop, "kept_blocks": kept, "score_windows": int(win.shape[0]),
                  "protected": {"first": first, "last": last},
                  "scores": {str(k): v for k, v in scores.items()},
                  "score_meaning": ("angular distance d(l, n) of the run of n blocks starting at l" if
                                    opts.criterion == "angular" else "score of block i (lowest removed first)"),
                  "why": why}
        return PruneOutcome(record, renames, label=opts.criterion)


def renamed(names: list[str], prefix: str, kept: list[int]) -> dict[str, str | None]:
    """``{old name: new name, or None if its block was removed}`` for layer names inside the blocks."""
    new_of = {old: new for new, old in enumerate(kept)}
    out: dict[str, str | None] = {}
    for name in names:
        i, rest = name[len(prefix) + 1:].split(".", 1)
        j = new_of.get(int(i))
        out[name] = None if j is None else f"{prefix}.{j}.{rest}"
    return out
