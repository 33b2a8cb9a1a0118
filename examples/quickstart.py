"""Quick start: the smallest end-to-end FlexOlmo run, on a CPU, in well under a minute.

1. **Public model.** A tiny OLMo-2 built from a ``transformers`` config (no hub), trained for
   a few dozen steps on public text, saved with ``save_pretrained``.
   The coordinator publishes a :class:`flexmoe.FederationSpec` for it, with the token counts of
   its public text in a file next to the spec (what ``flexmoe spec --public-data`` writes).
2. **Owners.** Each owner upcycles the public model (:func:`flexmoe.core.surgery`: expert 0 = the
   frozen public MLP, expert 1 = a copy), trains only expert 1 and its router row on its own
   text with plain ``torch`` AdamW, checks the public part still has the published
   fingerprint, and saves its :class:`flexmoe.ExpertArtifact` (one safetensors file) with the
   token counts of its training text.
3. **Coordinator.** ``flexmoe assemble --public ... --experts ... --spec ... --out ... --format remote``:
   the default routing recipe, the posterior router (each token runs the public expert and the
   owner whose text the row so far most resembles, by the token counts, mixed by that owner's own
   router), exported as a ``transformers`` checkpoint with its modeling code.
4. **Check.** ``transformers.AutoModelForCausalLM`` (``trust_remote_code=True``) loads the result
   and gives the same logits as :func:`flexmoe.merge_experts`'s in-memory model.
5. **Result.** Held-out perplexity per domain: the merged model against the public model and each
   owner's own model, then :func:`flexmoe.opt_out`.

Text is whatever every Python install carries, so the run needs no download: the standard
library's docstrings (public), its code with the docstrings removed (owner ``code``) and
licence texts (owner ``licenses``: Python's ``LICENSE.txt`` plus ``/usr/share/common-licenses``
where that exists). Tokens are bytes (id = byte value, vocabulary 256): no tokenizer to train.

Run ``python examples/quickstart.py --help`` for the options; outputs go under ``--out``.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import torch
from transformers import AutoModelForCausalLM, Olmo2Config

import flexmoe
from flexmoe.artifacts.unigram import write_public_statistics
from flexmoe.core.surgery import moe_blocks
from flexmoe.data.statistics import token_statistics
from flexmoe.spec import RoutingRecipe

VOCAB = 256  # byte-level
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f}s] {msg}", flush=True)


# -- data -------------------------------------------------------------------------------


def stdlib_files(limit: int) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))[:limit]


def docstrings_and_code(files: list[Path]) -> tuple[str, str]:
    """Split Python sources into their docstrings (prose) and the code without them."""
    docs, code = [], []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                body = node.body
                if doc and body and isinstance(body[0], ast.Expr):
                    docs.append(doc)
                    node.body = body[1:] or [ast.Pass()]
        code.append(ast.unparse(tree))
    return "\n\n".join(docs), "\n\n".join(code)


def licence_text() -> str:
    paths = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        paths += sorted(p for p in common.iterdir() if p.is_file())
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths if p.is_file())


def to_ids(text: str, max_bytes: int) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")[:max_bytes]), dtype=torch.long)


def split(ids: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(ids) * (1 - held_out))
    return ids[:cut], ids[cut:]


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Endless random windows of ``seq_len`` tokens."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """Up to ``n`` non-overlapping held-out windows, the same for every model."""
    n = min(n, len(ids) // seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    model.eval()
    return math.exp(model(windows, labels=windows).loss.item())


# -- training ---------------------------------------------------------------------------


def train(model, params, data, steps: int, lr: float, *, z_loss: float = 0.0) -> float:
    """Plain AdamW (beta 0.9/0.95, no weight decay, clip 1.0), as in FlexOlmo's recipe."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = next(data)
        if z_loss:
            with flexmoe.record_router_logits(model) as logits:
                loss = model(x, labels=x).loss
            loss = loss + z_loss * flexmoe.router_z_loss(logits)
        else:
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def train_owner_expert(public_dir: Path, owner: str, data, steps: int, lr: float, public_fp: str):
    """One owner: upcycle, train expert 1 and router row r_1 only, return the model."""
    model = AutoModelForCausalLM.from_pretrained(public_dir)
    flexmoe.upcycle(model, num_experts=1, owners=[owner])  # top_k = all (2) while training
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for block in moe_blocks(model):
        for p in block.experts[1].parameters():
            p.requires_grad_(True)
            params.append(p)
        # Only router row r_1 learns; r_0 (the public row) stays as published. The bias
        # beta_1 stays 0 because the FlexOlmo export format has no router bias.
        block.router.freeze_rows([1])
        block.router.weight.requires_grad_(True)
        params.append(block.router.weight)
    loss = train(model, params, data, steps, lr, z_loss=1e-3)
    if flexmoe.fingerprint(model) != public_fp:
        raise RuntimeError(f"owner {owner}: the frozen public tensors changed during training")
    return model, loss


# -- the run ----------------------------------------------------------------------------


def main(
    out: str = "quickstart_out",
    public_steps: int = 150,
    owner_steps: int = 60,
    seq_len: int = 128,
    batch_size: int = 16,
    eval_windows_per_domain: int = 24,
    files: int = 120,
    max_bytes: int = 400_000,
    seed: int = 0,
) -> None:
    """Run the quick start.

    Args:
        out: Output directory (public model, expert artifacts, merged model).
        public_steps: Training steps of the public model.
        owner_steps: Training steps of each owner's expert.
        seq_len: Tokens (bytes) per training window.
        batch_size: Windows per step.
        eval_windows_per_domain: Held-out windows per domain for perplexity.
        files: How many standard-library modules to read text from.
        max_bytes: Cap on each domain's text.
        seed: Seed for initialisation and data order.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    out_dir = Path(out)
    for sub in ("public", "experts", "merged"):  # this script's own outputs only
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    docs, code = docstrings_and_code(stdlib_files(files))
    texts = {"public": docs, "code": code, "licenses": licence_text()}
    domains = {name: split(to_ids(t, max_bytes)) for name, t in texts.items()}
    for name, (_, ho) in domains.items():
        if len(ho) < 2 * seq_len:
            raise SystemExit(f"quickstart: too little {name!r} text on this machine ({len(ho)} held-out bytes)")
    for name, (tr, ho) in domains.items():
        log(f"domain {name:9s}: {len(tr):7,d} training bytes, {len(ho):6,d} held-out bytes")
    held_out = {name: eval_windows(ho, seq_len, eval_windows_per_domain) for name, (_, ho) in domains.items()}

    # 1. The public model: trained on public data only, then published.
    config = Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(256, seq_len),
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    public = AutoModelForCausalLM.from_config(config)
    loss = train(
        public,
        list(public.parameters()),
        batches(domains["public"][0], seq_len, batch_size, seed),
        public_steps,
        lr=3e-3,
    )
    public_dir = out_dir / "public"
    public.save_pretrained(public_dir)
    public_fp = flexmoe.fingerprint(public)
    log(f"public model: {public_steps} steps, loss {loss:.3f}, saved to {public_dir} (fingerprint {public_fp[:12]}…)")

    # The coordinator's spec, with the public text's token counts next to it: the default routing
    # recipe (the posterior router) compares them with each owner's.
    # Token counts (unigrams, and bigrams in the recipe's buckets) of one text stream: one long row.
    buckets = RoutingRecipe().bigram_buckets

    def counts(ids: torch.Tensor):
        return token_statistics(ids[None], VOCAB, buckets)

    spec_path = out_dir / "spec.json"
    spec = flexmoe.FederationSpec(
        public_model=str(public_dir),
        fingerprint=public_fp,
        public_statistics=write_public_statistics(spec_path, counts(domains["public"][0])),
    )
    spec.save(spec_path)
    log(f"spec {spec_path} (routing: {spec.routing.method}), public token counts in {spec.public_statistics.file}")

    # 2. Each owner trains one expert on data that never leaves it, and ships an artifact.
    owners = ["code", "licenses"]
    artifact_paths, own_expert = [], {}
    for i, owner in enumerate(owners):
        data = batches(domains[owner][0], seq_len, batch_size, seed + 1 + i)
        model, loss = train_owner_expert(public_dir, owner, data, owner_steps, lr=3e-3, public_fp=public_fp)
        artifact = flexmoe.ExpertArtifact.from_model(
            model,
            owner=owner,
            expert=owner,
            training_tokens=owner_steps * batch_size * seq_len,
            spec_sha256=spec.sha256,
            **counts(domains[owner][0])._asdict(),  # its training text's token counts
        )
        path = artifact.save(out_dir / "experts" / f"{owner}.safetensors")
        own_expert[owner] = perplexity(model, held_out[owner])
        artifact_paths.append(path)
        log(
            f"owner {owner!r}: {owner_steps} steps, loss {loss:.3f}, artifact {path} "
            f"({path.stat().st_size / 1e6:.2f} MB)"
        )

    # 3. The coordinator merges them with the command line tool, by the spec's (default) recipe.
    merged_dir = out_dir / "merged"
    cli = Path(sys.executable).with_name("flexmoe")
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "flexmoe"]
    cmd += [
        "assemble",
        "--public",
        str(public_dir),
        "--experts",
        *map(str, artifact_paths),
        "--spec",
        str(spec_path),
        "--out",
        str(merged_dir),
        "--format",
        "remote",
    ]
    log("$ " + " ".join(["flexmoe", *cmd[cmd.index("assemble") :]]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:  # e.g. no public statistics: the command says what to pass instead
        raise SystemExit(f"quickstart: flexmoe assemble failed:\n{done.stderr.strip()}")

    # 4. Anyone can load the merged model with plain transformers; flexmoe's own model agrees.
    merged_hf = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    merged = flexmoe.merge_experts(public_dir, artifact_paths, spec=spec_path).model.eval()
    probe = held_out["code"][:2]
    with torch.no_grad():
        diff = (merged_hf(probe).logits - merged(probe).logits).abs().max().item()
    log(f"{type(merged_hf).__name__} from {merged_dir}: max |logit difference| vs flexmoe.merge_experts = {diff:.2e}")
    if diff > 1e-4:
        raise RuntimeError(f"the exported model disagrees with flexmoe's (max abs logit difference {diff:.2e})")

    # 5. Held-out perplexity per domain, then owner "code" opts out.
    public = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    table = {
        "public model": {d: perplexity(public, w) for d, w in held_out.items()},
        "each owner's own 2-expert model": own_expert,
        "merged (all experts)": {d: perplexity(merged, w) for d, w in held_out.items()},
    }
    flexmoe.opt_out(merged, "code")
    table["merged, 'code' opted out"] = {d: perplexity(merged, w) for d, w in held_out.items()}
    only_licenses = flexmoe.merge_experts(public_dir, artifact_paths[1:], spec=spec_path).model.eval()
    with torch.no_grad():
        same = (merged(probe).logits - only_licenses(probe).logits).abs().max().item()

    print()
    print(f"{'held-out perplexity (bytes)':32s}" + "".join(f"{d:>10s}" for d in held_out) + f"{'average':>10s}")
    for label, ppl in table.items():
        cells = [f"{ppl[d]:10.2f}" if d in ppl else f"{'-':>10s}" for d in held_out]
        avg = f"{sum(ppl.values()) / len(ppl):10.2f}" if len(ppl) == len(held_out) else ""
        print(f"{label:32s}" + "".join(cells) + avg)
    print()
    merged_ppl = table["merged (all experts)"]
    for d in held_out:
        ref = table["public model"][d] if d == "public" else own_expert[d]
        what = "the public model" if d == "public" else "its own model"
        print(f"merged / {what} on {d} text: {merged_ppl[d] / ref:.3f}")
    for d in own_expert:  # what the owners gain by joining: their text, against the public model alone
        print(f"merged / public model on the owner's {d} text: {merged_ppl[d] / table['public model'][d]:.3f}")
    print("(The posterior router sends each row to the public expert and the owner its text so far most")
    print(" resembles, mixed by that owner's own router: close to each owner's own model on its text.)")
    print()
    log(f"after opt_out('code') the model equals one assembled without 'code' (max |logit difference| {same:.1e})")
    log(f"done; outputs under {out_dir}/ (merged model: {merged_dir})")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
