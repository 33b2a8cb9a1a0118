"""Peak memory of the coordinator's assembly: streaming ``assemble_to_dir`` vs in-memory.

Setup (once, before anything is measured): a ~34M-parameter public model (Llama by default:
hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192, float32) saved to a temporary
directory, and 8 owners' expert artifacts (perturbed copies of its MLPs, random router rows and
negative biases) saved as safetensors.

Then, for each number of experts n, two fresh Python processes (so neither inherits the other's
heap) each assemble ``[public, e_1 ... e_n]`` into a new directory:

- streaming: ``flexmoe.assemble_to_dir(public_dir, artifacts[:n], out)`` -- one artifact
  tensor in memory at a time;
- in-memory: ``flexmoe.export(flexmoe.assemble(public, artifacts[:n]), out)`` -- the whole MoE.

Each child reports its peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, which includes
the interpreter, torch and transformers: see the "baseline" column, the RSS just before the
work starts) and wall time, and what the resident set held at its peak (sampled from
``/proc/self/status`` every 10 ms): file-backed pages (``RssFile``: the public checkpoint, which
``from_pretrained`` memory-maps, and any artifact read through a map) and anonymous memory
(``RssAnon``: tensors read into the heap). The targets: streaming peak at 8 experts <= 1.2x that
at 2, and <= 1.3x the public model's weights over the baseline (docs/scale.md).

    .venv/bin/python benchmarks/assembly_memory.py
    .venv/bin/python benchmarks/assembly_memory.py --arch olmo2 --experts 2 4 8 16
    .venv/bin/python benchmarks/assembly_memory.py --arch olmo2 --shape olmo2-1b --layers 4 --experts 2 8 \
        --no-in-memory --keep /tmp/assembly-1b   # --keep: set up once, reuse on the next run
    .venv/bin/python benchmarks/assembly_memory.py --arch olmo2 --shape olmo2-1b --experts 8 \
        --no-in-memory --zero-experts    # the whole 1B: artifacts as holes, ~38 GB of disk for the export

``--zero-experts`` writes every expert's MLP weights as zeros and punches them out of the files
(``fallocate --dig-holes``), so eight whole-1B artifacts cost no disk; the assembly reads, checks
and writes each tensor exactly as it would any other values, so what it holds is the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WIDTHS = [7, 8, 11, 10, 10, 8, 11, 8, 19]


def _status_mb() -> dict[str, float]:
    """``VmRSS``, ``RssFile`` and ``RssAnon`` of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssFile", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _rss_mb() -> float:
    return _status_mb().get("VmRSS", float("nan"))


class _PeakSampler(threading.Thread):
    """The ``/proc/self/status`` sample with the largest ``VmRSS``, every 10 ms until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _status_mb()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.01):
            sample = _status_mb()
            if sample["VmRSS"] > self.peak["VmRSS"]:
                self.peak = sample


def child(mode: str, work: Path, n: int, fmt: str) -> None:
    """Run one assembly and print ``{"peak_mb", "baseline_mb", "wall_s", "file_mb", "anon_mb"}`` as JSON."""
    from transformers import AutoModelForCausalLM

    import flexmoe

    paths = sorted(work.glob("artifacts/owner_*.safetensors"))[:n]
    out = work / f"out-{mode}-{n}"
    baseline = _rss_mb()
    sampler = _PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if mode == "streaming":
        flexmoe.assemble_to_dir(work / "public", paths, out, format=fmt)
    else:
        model = flexmoe.assemble(AutoModelForCausalLM.from_pretrained(work / "public"), paths)
        flexmoe.export(model, out, fmt)
    wall = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    at_peak = {"file_mb": sampler.peak["RssFile"], "anon_mb": sampler.peak["RssAnon"]}
    print(json.dumps({"peak_mb": peak, "baseline_mb": baseline, "wall_s": wall, **at_peak}))


def setup(
    work: Path,
    arch: str,
    num_artifacts: int,
    shape: str | None = None,
    layers: int | None = None,
    zero_experts: bool = False,
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import flexmoe
    from flexmoe.core.surgery import moe_blocks
    from flexmoe.plan import KNOWN_CONFIGS

    if shape:  # a real model's shape (flexmoe.plan), optionally with fewer decoder layers
        fields = {**KNOWN_CONFIGS[shape], **({"num_hidden_layers": layers} if layers else {})}
        config = AutoConfig.for_model(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        config = AutoConfig.for_model(
            arch,
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    torch.manual_seed(0)
    public = AutoModelForCausalLM.from_config(config).eval()
    size = sum(p.numel() * p.element_size() for p in public.parameters())
    print(f"public model: {config.model_type}, {size / 4e6:.1f}M parameters, {size / 1e6:.0f} MB", flush=True)
    public.save_pretrained(work / "public")
    fp = flexmoe.fingerprint(public)
    model = flexmoe.upcycle(public, 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(num_artifacts):
            for block in moe_blocks(model):
                block.experts[1].load_state_dict(block.experts[0].state_dict())
                for p in block.experts[1].parameters():
                    if zero_experts:
                        p.zero_()
                    else:
                        p.add_(torch.randn(p.shape, generator=g) * 0.01)
                block.router.weight[1] = torch.randn(config.hidden_size, generator=g)
                block.router.bias[1] = -float(torch.rand(1, generator=g))
            art = flexmoe.ExpertArtifact.from_model(model, owner=f"owner_{i}", fingerprint=fp)
            path = work / "artifacts" / f"owner_{i}.safetensors"
            art.save(path)
            if zero_experts:  # the zero pages become holes: 8 x 3.2 GB of artifacts at 1B take no disk
                subprocess.run(["fallocate", "--dig-holes", str(path)], check=True)
    (work / "public_bytes").write_text(str(size))  # last: marks a complete setup for --keep


def measure(mode: str, work: Path, n: int, fmt: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--n", str(n), "--format", fmt]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} with {n} experts failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama", choices=["llama", "olmo2", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--shape", help="a known shape from flexmoe.plan (olmo2-1b, ...) instead of the 34M default")
    ap.add_argument("--layers", type=int, help="with --shape: this many decoder layers")
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="owner experts to assemble")
    ap.add_argument("--format", default="native", help="native (keeps router biases), flexolmo, mixtral")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory comparison")
    ap.add_argument(
        "--zero-experts",
        action="store_true",
        help="experts' MLP weights all zero, stored as holes (8 x 1B artifacts fit the disk; memory is the same)",
    )
    ap.add_argument("--keep", type=Path, help="set up in this directory and keep it (reused when it holds a setup)")
    ap.add_argument("--child", choices=["setup", "streaming", "in-memory"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "setup":
        return setup(args.work, args.arch, args.n, args.shape, args.layers, args.zero_experts)
    if args.child:
        return child(args.child, args.work, args.n, args.format)

    with tempfile.TemporaryDirectory(prefix="flexmoe-assembly-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "public_bytes").exists():
            # In a child too: a process started from this one inherits its peak resident set
            # (Linux keeps ru_maxrss across fork and exec), so this one must stay small.
            cmd = [sys.executable, __file__, "--child", "setup", "--work", str(work), "--n", str(max(args.experts))]
            cmd += ["--arch", args.arch] + (["--shape", args.shape] if args.shape else [])
            cmd += (["--layers", str(args.layers)] if args.layers else []) + (["--zero-experts"] * args.zero_experts)
            subprocess.run(cmd, check=True)
        for old in work.glob("out-*"):
            shutil.rmtree(old)
        public_mb = int((work / "public_bytes").read_text()) / 2**20
        rows = []
        for n in args.experts:
            s = measure("streaming", work, n, args.format)
            m = None if args.no_in_memory else measure("in-memory", work, n, args.format)
            rows.append((n, s, m))
            print(f"  measured {n} experts", file=sys.stderr, flush=True)
    first = rows[0][1]["peak_mb"]
    print(f"\nassembly of public + n experts ({args.shape or args.arch}, format={args.format}); RSS in MB, time in s")
    print(
        f"public model's weights: {public_mb:.0f} MB; stream peak over baseline / public weights: "
        + ", ".join(f"{n} experts {(s['peak_mb'] - s['baseline_mb']) / public_mb:.2f}" for n, s, _ in rows)
    )
    columns = ["experts", "baseline", "stream peak", "peak: file", "peak: anon", "stream s"]
    columns += ["in-mem peak", "in-mem s", "stream peak / first"]
    head = " | ".join(f"{c:>{w}}" for c, w in zip(columns, WIDTHS))
    print(head)
    print("-" * len(head))
    for n, s, m in rows:
        cells = [
            n,
            f"{s['baseline_mb']:.0f}",
            f"{s['peak_mb']:.0f}",
            f"{s['file_mb']:.0f}",
            f"{s['anon_mb']:.0f}",
            f"{s['wall_s']:.2f}",
            f"{m['peak_mb']:.0f}" if m else "-",
            f"{m['wall_s']:.2f}" if m else "-",
            f"{s['peak_mb'] / first:.2f}",
        ]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)))


if __name__ == "__main__":
    main()
