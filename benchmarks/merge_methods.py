"""Wall time and peak RSS of directory-to-directory merges, flexmoe vs mergekit.

TIES (``trim: per_tensor`` and ``trim: global``) and task arithmetic over N = 2, 4, 8
fine-tuned variants of a ~34M-parameter Llama (hidden 512, intermediate 1376, 8 layers,
vocabulary 8192, untied head, float32), each saved with ``save_pretrained`` as safetensors.
Every merge runs in a fresh subprocess (``flexmoe.merge.merge(config, out)``, or
``mergekit-yaml config out``) and is measured from outside: wall time (including Python start
and imports, for both), and peak RSS from ``os.wait4``. The parent never imports torch: Linux
starts a child's peak RSS at its parent's size when it forks, so inputs are made and outputs
compared in subprocesses too. The inputs are read once before timing so both tools start from
a warm page cache. Where both tools compute the same thing the outputs are compared (max |Δ|).
``--threads N`` sets ``OMP_NUM_THREADS`` for both tools (on a machine shared with other jobs,
torch's default of one thread per core can stall on busy cores).

mergekit is only ever run as a command, from its own virtual environment, e.g.::

    python3 -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install mergekit
    python benchmarks/merge_methods.py --mergekit /tmp/mergekit-venv/bin/mergekit-yaml

Without ``--mergekit`` (or when it is not installed) only flexmoe's figures are reported.
mergekit's TIES trims each tensor on its own, elects signs by weighted mass and averages the
agreeing entries, i.e. flexmoe's ``trim: per_tensor, sign: weighted_mass`` (the same as
``sign: mass`` with equal weights); flexmoe's global trim has no mergekit counterpart and is
shown next to mergekit's TIES.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

SIZES = (2, 4, 8)
DENSITY = 0.2


def make_inputs(work: Path, n: int) -> tuple[Path, list[Path]]:
    """The base model and ``n`` fine-tuned variants (base + seeded Gaussian noise, std 1e-3)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    base_dir = work / "base"
    variants = [work / f"ft{i}" for i in range(n)]
    if base_dir.is_dir() and all(v.is_dir() for v in variants):
        return base_dir, variants
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    print(
        f"inputs: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama, base + {n} variants",
        file=sys.stderr,
    )
    if not base_dir.is_dir():
        model.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, path in enumerate(variants):
        if path.is_dir():
            continue
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(base[name] + torch.randn(p.shape, generator=g) * 1e-3)
        model.save_pretrained(path)
    return base_dir, variants


def configs(method: str, base: Path, models: list[Path]) -> tuple[dict, dict | None]:
    """(flexmoe config, mergekit config or None)."""
    paths = [str(m) for m in models]
    if method == "task_arithmetic":
        ours = {"method": "task_arithmetic", "base": str(base), "models": paths}
        theirs = {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "dtype": "float32",
            "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
        }
        return ours, theirs
    trim = method.removeprefix("ties_")
    ours = {"method": "ties", "base": str(base), "models": paths, "density": DENSITY, "trim": trim}
    theirs = {
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [{"model": p, "parameters": {"weight": 1.0, "density": DENSITY}} for p in paths],
    }
    return ours, theirs


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds and peak RSS (MB) of it and its children."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def _max_abs_diff(a: Path, b: Path) -> float:
    from flexmoe.merge.stream import SafetensorsDir

    x, y = SafetensorsDir(a), SafetensorsDir(b)
    worst = 0.0
    for name in x.names():
        worst = max(worst, float((x.get(name).double() - y.get(name).double()).abs().max()))
    return worst


def in_subprocess(*args: str) -> str:
    """Run this script's helper mode in a fresh process and return what it prints."""
    return subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--make-inputs", "--diff"):  # helper modes, run as subprocesses
        if sys.argv[1] == "--make-inputs":
            base, variants = make_inputs(Path(sys.argv[2]), int(sys.argv[3]))
            print(json.dumps([str(base), *map(str, variants)]))
        else:
            print(_max_abs_diff(Path(sys.argv[2]), Path(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/flexmoe-merge-bench", help="inputs and outputs go here")
    parser.add_argument("--n", type=int, nargs="+", default=list(SIZES), help="numbers of fine-tuned models")
    parser.add_argument("--methods", nargs="+", default=["ties_per_tensor", "ties_global", "task_arithmetic"])
    parser.add_argument(
        "--mergekit",
        default=shutil.which("mergekit-yaml"),
        help="path of mergekit-yaml (in its own venv); omit to report flexmoe alone",
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both tools")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in json.loads(in_subprocess("--make-inputs", str(work), str(max(args.n))).splitlines()[-1])]
    base, variants = paths[0], paths[1:]
    if args.mergekit and not Path(args.mergekit).exists():
        print(f"mergekit-yaml not found at {args.mergekit}; reporting flexmoe alone")
        args.mergekit = None
    rows = []
    for n in args.n:
        models = variants[:n]
        warm([base, *models])
        mergekit_ties = None
        for method in args.methods:
            ours_cfg, theirs_cfg = configs(method, base, models)
            row = {"method": method, "n": n}
            cfg = work / f"flexmoe-{method}-{n}.yaml"
            cfg.write_text(yaml.safe_dump(ours_cfg))
            out_ours = work / f"out-flexmoe-{method}-{n}"
            shutil.rmtree(out_ours, ignore_errors=True)
            code = "import sys; from flexmoe.merge import merge; merge(sys.argv[1], sys.argv[2])"
            row["flexmoe"] = measure([sys.executable, "-c", code, str(cfg), str(out_ours)], work / "flexmoe.log")
            out_theirs = work / f"out-mergekit-{method}-{n}"
            if args.mergekit and method != "ties_global":
                mk = work / f"mergekit-{method}-{n}.yaml"
                mk.write_text(yaml.safe_dump(theirs_cfg))
                shutil.rmtree(out_theirs, ignore_errors=True)
                cmd = [args.mergekit, str(mk), str(out_theirs), "--no-copy-tokenizer", "--quiet"]
                row["mergekit"] = measure(cmd, work / "mergekit.log")
                row["max_abs_diff"] = float(in_subprocess("--diff", str(out_ours), str(out_theirs)).split()[-1])
                shutil.rmtree(out_theirs, ignore_errors=True)
                if method == "ties_per_tensor":
                    mergekit_ties = row["mergekit"]
            elif args.mergekit and mergekit_ties is not None:
                row["mergekit"] = dict(mergekit_ties, note="mergekit ties (per tensor)")
            shutil.rmtree(out_ours, ignore_errors=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(table(rows))


def table(rows: list[dict]) -> str:
    header = (
        "| method | N | flexmoe wall s | flexmoe peak RSS MB | mergekit wall s | mergekit peak RSS MB "
        "| time ratio | RSS ratio | max abs diff |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = r["flexmoe"], r.get("mergekit")
        cells = [r["method"], str(r["n"]), f"{ours['wall_s']:.1f}", f"{ours['peak_rss_mb']:.0f}"]
        if theirs:
            star = "*" if "note" in theirs else ""
            cells += [
                f"{theirs['wall_s']:.1f}{star}",
                f"{theirs['peak_rss_mb']:.0f}{star}",
                f"{ours['wall_s'] / theirs['wall_s']:.2f}",
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}",
                f"{r['max_abs_diff']:.2g}" if "max_abs_diff" in r else "-",
            ]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    if any("note" in (r.get("mergekit") or {}) for r in rows):
        lines.append("\n\\* mergekit has no global trim: its per-tensor TIES at the same N, for reference.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
