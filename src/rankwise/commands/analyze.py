"""``rankwise analyze``: per-layer spectral diagnostics (thin over ``rankwise.analyze``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..calibration.sampling import DEFAULT_SEED
from ..errors import ConfigError
from ._common import ModelArg, QuietOpt, TextFileOpt, check_output_file, console, err_console, setup

FARMS_SAMPLINGS = ("grid", "random")


def _calib_windows(model, tok, text_file, n, seqlen, seed):
    from ..calibration.corpus import load_corpus
    from ..calibration.sampling import calib_windows, check_seqlen, tokenize

    check_seqlen(model, seqlen)
    return calib_windows(tokenize(tok, load_corpus("calib", text_file)), n, seqlen, seed)


def check_device(device: str | None) -> None:
    """``--device`` names a torch device that exists here, else :class:`ConfigError`."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "meta": False, "cuda": torch.cuda.is_available(),
                 "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise ConfigError(f"--device {device!r} is not available on this machine; use --device cpu or omit it")


def _cols(result) -> list[tuple[str, str]]:
    keys = {k for r in result.layers for k in r}
    cols = [("name", "layer"), ("shape", "shape"), ("alpha", "alpha"), ("farms_alpha", "FARMS alpha"),
            ("stable_rank", "stable rank"), ("effective_rank", "eff. rank"), ("rank90", "r90%"),
            ("w_rank90", "whitened r90%"), ("intruders", "intruders"), ("relative_change", "rel. change"),
            ("align_u_mean", "align u"), ("align_v_mean", "align v")]
    return [(k, h) for k, h in cols if k in keys]


def _cell(r: dict, k: str):
    v = r.get(k)
    if k == "shape":
        return "x".join(map(str, v))
    if v is None and k == "alpha":
        return "missing"
    return "" if v is None else v


def _print_table(res, title: str) -> None:
    """Rich table, one row per layer; names lose their common prefix (e.g. ``model.layers.``) and never wrap."""
    import os

    from rich.table import Table

    from ._common import fmt

    cols = _cols(res)
    names = [r["name"] for r in res.layers]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    t = Table(title=title + (f"  ({prefix}*)" if prefix else ""), header_style="bold")
    for k, h in cols:
        t.add_column(h, no_wrap=k == "name", justify="left" if k in ("name", "shape") else "right")
    for r in res.layers:
        t.add_row(*[(r["name"][len(prefix):] if k == "name" else fmt(_cell(r, k))) for k, _ in cols])
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        model: Optional[str] = ModelArg,
        layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated names or regexes of the layers "
                                             "to analyze (default: every linear layer but embeddings/LM head)."),
        compare: Optional[str] = typer.Option(None, "--compare", help="Base model to compare MODEL (the tuned one) "
                                              "with: intruder dimensions, relative change."),
        match: Optional[str] = typer.Option(None, "--match", help="With --compare: first permute MODEL into the compared "
                                            "model's basis (weight or activation matching); the alignment of "
                                            "singular vectors before vs after shows what matching aligned."),
        calib: bool = typer.Option(False, "--calib", help="Also the activation-aware (whitened) spectrum, from "
                                   "calibration windows of the default corpus or --text-file."),
        text_file: Optional[Path] = TextFileOpt,
        calib_windows: int = typer.Option(64, min=1, help="Calibration windows (with --calib)."),
        calib_seqlen: int = typer.Option(512, min=2, help="Tokens per calibration window."),
        seed: int = typer.Option(DEFAULT_SEED, help="Seed for calibration windows and FARMS random sampling."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metrics (default: spectrum,"
                                              "powerlaw,farms [+whitened] [+intruders])."),
        intruder_k: int = typer.Option(10, min=1, help="Top-k tuned singular vectors checked for intruders."),
        intruder_eps: float = typer.Option(0.5, help="Intruder threshold on max |cosine similarity|."),
        farms_sampling: str = typer.Option("grid", help="FARMS windows: 'grid' (paper) or 'random' (seeded)."),
        device: Optional[str] = typer.Option(None, help="Device for the spectra (e.g. cuda); default: model's."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write {layers, summary} as JSON."),
        csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write one row per layer as CSV."),
        report: Optional[Path] = typer.Option(None, "--report", help="Write an HTML report with PNG plots to DIR."),
        overwrite: bool = typer.Option(False, help="Replace an existing --report directory."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Singular values, stable/effective rank, energy ranks, power-law alpha (WeightWatcher-compatible),
        FARMS alpha, whitened spectrum (--calib) and intruder dimensions (--compare), per layer."""
        check_output_file(json_out, "--json", ".json")
        check_output_file(csv_out, "--csv", ".csv")
        if farms_sampling not in FARMS_SAMPLINGS:
            raise ConfigError(f"unknown --farms-sampling {farms_sampling!r}; use {' or '.join(FARMS_SAMPLINGS)}")
        if match is not None and (compare is None or match not in ("weight", "activation")):
            raise ConfigError("--match takes weight or activation and needs --compare" if compare is not None
                              else "--match needs --compare (the model to match MODEL to)")
        setup(quiet)
        from ..analysis.run import analyze
        from ..models.loading import load_model

        check_device(device)

        m, tok, path = load_model(model)
        base = load_model(compare)[0] if compare else None
        if match is not None:
            from ..calibration.corpus import load_corpus
            from ..calibration.sampling import calib_windows, tokenize
            from ..merging.matching import match as match_models

            data = (calib_windows(tokenize(tok, load_corpus("calib", text_file)), 16, 256, seed)
                    if match == "activation" else None)
            m, mres = match_models(base, m, data=data, method=match, seed=seed)
            console.print(f"matched MODEL into the compared model's basis ({match} matching: <A, B> "
                          f"{mres.objective_before:.4g} -> {mres.objective_after:.4g})")
        windows = _calib_windows(m, tok, text_file, calib_windows, calib_seqlen, seed) if calib else None
        res = analyze(m, layers=layers, metrics=metrics, compare=base, calib=windows, intruder_k=intruder_k,
                      intruder_eps=intruder_eps, farms_sampling=farms_sampling, seed=seed, device=device,
                      progress=not quiet)
        if not quiet:
            _print_table(res, f"analyze {path}")
        s = res.summary
        a = s.get("alpha")
        line = f"{s['layers']} layers"
        if a:
            line += f"; alpha mean {a['mean']:.3g} (median {a['median']:.3g}), {s['alpha_in_2_6']:.0%} in [2, 6]"
        if "intruders_total" in s:
            line += f"; {s['intruders_total']} intruder dimensions"
        if "align_u_mean" in s:
            line += (f"; top-{intruder_k} singular vectors aligned |cos| u {s['align_u_mean']['mean']:.3f}, "
                     f"v {s['align_v_mean']['mean']:.3f}")
        console.print(line)
        for sk in res.skipped:
            err_console.print(f"[yellow]skipped[/] {sk['name']}: {sk['reason']}")
        if json_out:
            res.write_json(json_out)
            console.print(f"wrote {json_out}")
        if csv_out:
            res.write_csv(csv_out)
            console.print(f"wrote {csv_out}")
        if report:
            from ..analysis.report import write_report

            write_report(res, report, title=f"rankwise analyze {path}", overwrite=overwrite)
            console.print(f"wrote {report / 'index.html'}")
