"""Choose the committed Alpaca fine-tuning subset: 200 training and 100 held-out examples, disjoint.

Reads ../shared/data/alpaca_pool.json (the head of Stanford Alpaca; see its SOURCE.md), checks its sha256,
samples 300 pool indices with random.Random(SEED) among records with a non-empty instruction and output,
and writes data/alpaca_subset.json, data/alpaca_eval.json and data/README.md. Only this script reads
../shared; the project uses the files it writes. Run from anywhere: python scripts/make_alpaca_subset.py
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT.parent / "shared" / "data" / "alpaca_pool.json"
POOL_SHA256 = "a0e69f5d26abaa88a5273612be8482872aab8012ef83ccba867e6ae437b598f2"
SEED, N_TRAIN, N_EVAL = 0, 200, 100
FIELDS = ("instruction", "input", "output")


def sha256(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def choose(pool: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Pool indices of the training and held-out splits, each in pool order."""
    usable = [i for i, r in enumerate(pool) if r["instruction"].strip() and r["output"].strip()]
    picked = random.Random(SEED).sample(usable, N_TRAIN + N_EVAL)
    return sorted(picked[:N_TRAIN]), sorted(picked[N_TRAIN:])


def readme(pool: list[dict[str, str]], splits: dict[str, tuple[list[dict[str, str]], str]]) -> str:
    """data/README.md: provenance, selection, checksums, counts and licence."""
    n_empty = sum(1 for r in pool if not (r["instruction"].strip() and r["output"].strip()))
    rows = "\n".join(
        f"| `{name}` | {len(recs)} | {sum(1 for r in recs if r['input'])} | `{digest}` |"
        for name, (recs, digest) in splits.items()
    )
    return f"""# Alpaca fine-tuning data

Two small, disjoint subsets of the Stanford Alpaca instruction data (Taori et al., 2023,
"Stanford Alpaca: An Instruction-following LLaMA model", https://github.com/tatsu-lab/stanford_alpaca),
in Alpaca's own format: a JSON list of objects with `instruction`, `input` (may be empty) and `output`.

| file | examples | with non-empty `input` | sha256 |
|---|---|---|---|
{rows}

## Provenance
The pool is `alpaca_pool.json`: the first {len(pool):,} examples, in their original order and unchanged,
of Stanford Alpaca's `alpaca_data.json` (original, uncleaned text), copied byte for byte from GitHub
`tinh1115/alpaca-lora` (a fork of `tloen/alpaca-lora`), commit `6cdac152d87caebcc825f76b5fbbf4cff347d5cd`,
path `alpaca_data.json` (git blob `f06807d063f0daece461b84f69c2fff93118d306`), and checked against two
unrelated copies. It is the head of the 52,002-example file, not a random sample of it. The pool is not
part of this repository and is not needed at run time. Its sha256:
`{POOL_SHA256}`

## How the subsets were chosen
`python scripts/make_alpaca_subset.py` reads `../shared/data/alpaca_pool.json` and refuses a pool with
another sha256. It excludes the {n_empty} pool records with an empty `instruction` or `output`; from the
rest, `random.Random({SEED}).sample(indices, {N_TRAIN + N_EVAL})` picks pool indices: the first {N_TRAIN}
are the training subset, the remaining {N_EVAL} the held-out subset, each kept in pool order. Records are
written unchanged (`json.dumps(records, indent=2, ensure_ascii=False)` and a newline). Running the script
again reproduces these files byte for byte.

## Licence
The Stanford Alpaca data is licensed under Creative Commons Attribution-NonCommercial 4.0 International
(CC BY-NC 4.0), https://creativecommons.org/licenses/by-nc/4.0/ — use it for non-commercial purposes
only, and credit Stanford Alpaca (Taori et al., 2023). This licence covers the two JSON files in this
folder, not the code of this repository.
"""


def main() -> None:
    """Check the pool, choose the splits and write the three files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=POOL, help="alpaca_pool.json (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="output folder")
    args = parser.parse_args()
    if not args.pool.is_file():
        raise SystemExit(f"{args.pool}: pool not found; it lives in ../shared/data next to the repository")
    raw = args.pool.read_bytes()
    if sha256(raw) != POOL_SHA256:
        raise SystemExit(f"{args.pool}: sha256 is {sha256(raw)}, expected {POOL_SHA256}; wrong pool file")
    pool = json.loads(raw)
    for i, record in enumerate(pool):
        if not (isinstance(record, dict) and all(isinstance(record.get(f), str) for f in FIELDS)):
            raise SystemExit(f"{args.pool}: record {i} lacks one of the string fields {', '.join(FIELDS)}")
    train, held_out = choose(pool)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, indices in (("alpaca_subset.json", train), ("alpaca_eval.json", held_out)):
        records = [{f: pool[i][f] for f in FIELDS} for i in indices]
        text = json.dumps(records, indent=2, ensure_ascii=False) + "\n"
        write_atomic(args.out / name, text)
        splits[name] = (records, sha256(text.encode("utf-8")))
    write_atomic(args.out / "README.md", readme(pool, splits))
    print(f"wrote {', '.join(f'{n} ({len(r)})' for n, (r, _) in splits.items())} and README.md to {args.out}")


if __name__ == "__main__":
    main()
