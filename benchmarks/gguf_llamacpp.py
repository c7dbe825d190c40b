"""llama.cpp perplexity of three Q4_0 GGUF files of the same fp32 SmolLM2-135M-Instruct (issue 19, section 2).

Rows (all Q4_0 for the 210 block linears, the tied token embedding Q8_0 in every file, norms F32,
so the three files have the same size):

* ``ours-gptq-s<seed>``  ``rankwise compress --structure gptq`` (symmetric 4-bit, group 32, ``grid=gguf``:
                         llama.cpp's Q4_0 grid) on 64 x 512-token windows of ``wiki_calib.txt`` at seeded
                         offsets (the project's calibration protocol), then ``rankwise export --format gguf``
                         (bit-exact Q4_0 blocks);
* ``llama-quantize``     ``llama-quantize --token-embedding-type q8_0 F32.gguf Q4_0`` (llama.cpp's RTN);
* ``llama-imatrix``      ``llama-imatrix -c 512 --chunks 64`` on ``wiki_calib.txt`` (the first 64 consecutive
                         512-token chunks: the same amount of the same text, not the same offsets), then
                         ``llama-quantize --imatrix``;
* ``f32``                the fp32 model exported by rankwise (``--set dense_type=f32``), the reference.

Perplexity: ``llama-perplexity -c 512 --chunks 64 -b 512 -t 2`` on ``wiki_test.txt``: llama.cpp's own
protocol, which differs from rankwise's ``eval`` (same first 64 non-overlapping 512-token windows, but
llama.cpp scores only the second half of each window, 256 tokens each, and tokenizes the file
itself): compare the rows with each other, not with rankwise's perplexities.

llama.cpp is a benchmark-only build (never a dependency, not in this repository); ``--llama`` points at its
``build/bin``. Each step runs under the team's heavy lock when ``--lock``
is given, one step per acquisition, and is skipped when its output already exists (resumable). On a
busy shared box, run groups of steps under one acquisition each instead (as the results here were):

    python benchmarks/gguf_llamacpp.py --steps base,quantize                 # light: seconds
    flock /work/team/heavy.lock nice -n 5 python benchmarks/gguf_llamacpp.py --steps imatrix,ours,ppl \
        --seeds 3 --ppl-rows llama-quantize,llama-imatrix,ours-gptq-s3
    for s in 4 5; do flock /work/team/heavy.lock nice -n 5 python benchmarks/gguf_llamacpp.py \
        --steps ours,ppl --seeds $s --ppl-rows ours-gptq-s$s; done
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "export_gguf_llamacpp.json"
MODEL = "smollm2-135m-instruct"


def sh(cmd: list[str], lock: str | None, log: Path) -> str:
    """Run ``cmd`` (under ``flock lock nice -n 5`` when given: the heavy steps), append its output to ``log``,
    return it. Light steps (an export, a llama-quantize: seconds) pass ``lock=None``."""
    full = (["flock", lock, "nice", "-n", "5"] if lock else []) + [str(c) for c in cmd]
    t0 = time.time()
    p = subprocess.run(full, capture_output=True, text=True)
    out = p.stdout + p.stderr
    with open(log, "a") as f:
        f.write(f"$ {' '.join(full)}\n{out}\n[rc={p.returncode}, {time.time() - t0:.0f} s]\n")
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(full)}\n{out[-3000:]}")
    return out


def ppl(out: str) -> tuple[float, float]:
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if m is None:
        raise SystemExit("no final PPL in llama-perplexity's output")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-bench"))
    ap.add_argument("--llama", type=Path, default=Path("/work/envs/llama.cpp/build/bin"))
    ap.add_argument("--text", type=Path, default=Path("/work/team/reftext"))
    ap.add_argument("--seeds", default="3,4,5")
    ap.add_argument("--chunks", type=int, default=64, help="imatrix calibration chunks (and perplexity windows)")
    ap.add_argument("--ppl-chunks", type=int, default=None, help="perplexity windows (default --chunks): a "
                                                                  "reduced protocol when smaller, labelled in the JSON")
    ap.add_argument("--lock", default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", default="all", help="comma list of: base,quantize,imatrix,ours,ppl,rtn (default all)")
    ap.add_argument("--ppl-rows", default=None, help="comma list of the rows to measure (default: every file there)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    rk = [sys.executable, "-m", "rankwise"]
    calib, test = args.text / "wiki_calib.txt", args.text / "wiki_test.txt"
    seeds = [int(s) for s in args.seeds.split(",") if s]
    steps = set(args.steps.split(",")) if args.steps != "all" else {"base", "quantize", "imatrix", "ours", "ppl", "rtn"}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    rows = results["rows"]
    f32 = work / "f32" / "model.gguf"
    files = {"f32": f32, "llama-quantize": work / "q4_0-llama-quantize.gguf",
             "llama-imatrix": work / "q4_0-llama-imatrix.gguf"}
    files.update({f"ours-gptq-s{s}": work / f"ours-s{s}-gguf" / "model.gguf" for s in seeds})

    if "base" in steps and not f32.is_file():
        sh([*rk, "export", MODEL, "--format", "gguf", "--out", work / "f32", "--set", "dense_type=f32",
            "--set", "embedding_type=f32", "-q"], None, log)
    if "quantize" in steps and not files["llama-quantize"].is_file():
        sh([args.llama / "llama-quantize", "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0", f32,
            files["llama-quantize"], "Q4_0", "2"], None, log)
    imat = work / "imatrix.dat"
    if "imatrix" in steps:
        if not imat.is_file():
            sh([args.llama / "llama-imatrix", "-m", f32, "-f", calib, "-c", "512", "--chunks", str(args.chunks),
                "-b", "512", "-t", "2", "-o", imat], args.lock, log)
        if not files["llama-imatrix"].is_file():
            sh([args.llama / "llama-quantize", "--imatrix", imat, "--token-embedding-type", "q8_0",
                "--output-tensor-type", "q8_0", f32, files["llama-imatrix"], "Q4_0", "2"], None, log)
    if "ours" in steps:
        for s in seeds:
            qdir, gdir = work / f"ours-s{s}", work / f"ours-s{s}-gguf"
            if not (qdir / "rankwise.json").is_file():
                sh([*rk, "compress", MODEL, "--structure", "gptq", "--set", "bits=4", "--set", "symmetric=true",
                    "--set", "grid=gguf", "--group-size", "32", "--bits-per-weight", "5", "--calib-file", calib,
                    "--calib-windows", "64", "--calib-seqlen", "512", "--seed", str(s), "--out", qdir,
                    "--overwrite", "-q"], args.lock, log)
            if not (gdir / "model.gguf").is_file():
                sh([*rk, "export", qdir, "--format", "gguf", "--out", gdir, "--set", "embedding_type=q8_0",
                    "--overwrite", "-q"], None, log)
    if "rtn" in steps:  # our RTN on llama.cpp's grid, exported: how many Q4_0 blocks equal llama-quantize's
        rdir, rg = work / "rtn-q40", work / "rtn-q40-gguf"
        if not (rdir / "rankwise.json").is_file():
            sh([*rk, "compress", MODEL, "--structure", "rtn", "--set", "bits=4", "--set", "symmetric=true",
                "--set", "grid=gguf", "--group-size", "32", "--bits-per-weight", "5", "--calib-windows", "1",
                "--calib-seqlen", "32", "--out", rdir, "--overwrite", "-q"], None, log)
        if not (rg / "model.gguf").is_file():
            sh([*rk, "export", rdir, "--format", "gguf", "--set", "embedding_type=q8_0", "--out", rg, "--overwrite",
                "-q"], None, log)
        results["rtn_vs_llama_quantize"] = compare_blocks(rg / "model.gguf", files["llama-quantize"])
    if "ppl" in steps:
        wanted = set(args.ppl_rows.split(",")) if args.ppl_rows else set(files)
        order = sorted(files, key=lambda n: (not n.startswith("ours"), n != "llama-imatrix", n))  # ours first
        for name, path in ((n, files[n]) for n in order):
            if name not in wanted or not path.is_file() or rows.get(name, {}).get("ppl") is not None:
                continue
            before = Path("/proc/loadavg").read_text().split()[:3]
            chunks = args.ppl_chunks or args.chunks
            out = sh([args.llama / "llama-perplexity", "-m", path, "-f", test, "-c", "512", "--chunks",
                      str(chunks), "-b", "512", "-t", "2"], args.lock, log)
            p, err = ppl(out)
            rows.setdefault(name, {}).update({"ppl": p, "ppl_stderr": err, "file_bytes": path.stat().st_size,
                                              "ppl_windows": chunks,
                                              "loadavg_before": before,
                                              "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    ours = [rows[k]["ppl"] for k in rows if k.startswith("ours-gptq") and "ppl" in rows[k]]
    if ours and "ppl" in rows.get("llama-imatrix", {}):
        import statistics

        mean = statistics.mean(ours)
        results["summary"] = {
            "ours_mean": mean, "ours_min": min(ours), "ours_max": max(ours), "seeds": len(ours),
            "ours_over_imatrix": mean / rows["llama-imatrix"]["ppl"],
            "ours_over_llama_quantize": mean / rows["llama-quantize"]["ppl"] if "ppl" in rows.get("llama-quantize", {}) else None,
            "target": "ours <= 0.9 x imatrix", "met": mean <= 0.9 * rows["llama-imatrix"]["ppl"]}
    results["protocol"] = {"llama_perplexity": f"-c 512 --chunks {args.ppl_chunks or args.chunks} -b 512 -t 2 "
                                               "(scores the second half "
                                               "of each window)",
                           "imatrix": f"llama-imatrix -c 512 --chunks {args.chunks} on wiki_calib.txt",
                           "ours": "gptq 4-bit symmetric g32 grid=gguf, 64 x 512 calibration windows of wiki_calib.txt",
                           "token_embd": "Q8_0 in every file", "llama_cpp_commit": _llama_commit(args.llama)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def compare_blocks(a: Path, b: Path) -> dict:
    """Byte-level agreement of two GGUF files' tensors (Q4_0 blocks of 18 bytes; other tensors whole)."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    blocks = same = weights = wdiff = other = other_same = 0
    for k, x in ta.items():
        y = tb[k]
        if x.tensor_type.name != "Q4_0" or y.tensor_type.name != "Q4_0":
            other += 1
            other_same += int(x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data)))
            continue
        eq = (np.asarray(x.data).reshape(-1, 18) == np.asarray(y.data).reshape(-1, 18)).all(1)
        blocks, same = blocks + eq.size, same + int(eq.sum())
        da = gguf.quants.dequantize(x.data, x.tensor_type)
        db = gguf.quants.dequantize(y.data, y.tensor_type)
        weights, wdiff = weights + da.size, wdiff + int((da != db).sum())
    return {"q4_0_blocks": blocks, "identical_blocks": same, "identical_fraction": same / max(blocks, 1),
            "weights_differing": wdiff, "weights": weights, "other_tensors": other,
            "other_tensors_identical": other_same, "bytes": [a.stat().st_size, b.stat().st_size]}


def _llama_commit(binaries: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(binaries.parents[1]), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except (OSError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()
