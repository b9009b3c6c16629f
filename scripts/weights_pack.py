"""Pack a model folder into a few parts of at most 15 MiB, and back, bit for bit.

The lent GPU machine takes at most 64 MiB a call and returns at most 8 files of 16 MiB: an fp16
``model.safetensors`` travels byte-split, since the high bytes of fp16 numbers (sign, exponent)
compress well with lzma (17.5 -> 13.7 MB for sst2-mux2) and the low bytes not at all (kept raw).

    python scripts/weights_pack.py pack model_repository/sst2-mux2/1 .dev/mux2     # -> .dev/mux2.0 .1 .2
    python scripts/weights_pack.py unpack .dev/mux2 unpacked/sst2-mux2/1           # -> the folder again

Part 0 holds the small files of the folder (muxbert.json, tokenizer.json unless --no-tokenizer)
and the compressed high bytes; parts 1.. the raw low bytes.
"""

from __future__ import annotations

import argparse
import json
import lzma
import struct
from pathlib import Path

PART_BYTES = 15 * 2**20
WEIGHTS = "model.safetensors"


def pack(folder: Path, prefix: Path, tokenizer: bool = True, preset: int = 6) -> list[Path]:
    blob = (folder / WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    body = blob[8 + header_len :]
    small = {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file() and p.name != WEIGHTS and (tokenizer or p.name != "tokenizer.json")}
    meta = json.dumps({"files": small, "header": blob[: 8 + header_len].hex(), "odd": len(body) % 2}).encode()
    pad = body + b"\0" * (len(body) % 2)
    high, low = pad[1::2], pad[0::2]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts = [lzma.compress(struct.pack("<Q", len(meta)) + meta + high, preset=preset)]
    parts += [low[i : i + PART_BYTES] for i in range(0, len(low), PART_BYTES)]
    paths = []
    for i, data in enumerate(parts):
        path = prefix.with_name(f"{prefix.name}.{i}")
        path.write_bytes(data)
        paths.append(path)
    return paths


def unpack(prefix: Path, folder: Path) -> Path:
    head = lzma.decompress(prefix.with_name(f"{prefix.name}.0").read_bytes())
    meta_len = struct.unpack("<Q", head[:8])[0]
    meta = json.loads(head[8 : 8 + meta_len])
    high = head[8 + meta_len :]
    low = b"".join(prefix.with_name(f"{prefix.name}.{i}").read_bytes() for i in range(1, 1 + _count_low_parts(prefix)))
    if len(low) != len(high):
        raise ValueError(f"{prefix}: {len(low)} low bytes for {len(high)} high bytes (a part is missing)")
    body = bytearray(2 * len(high))
    body[0::2], body[1::2] = low, high
    if meta["odd"]:
        del body[-1]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS).write_bytes(bytes.fromhex(meta["header"]) + bytes(body))
    for name, text in meta["files"].items():
        (folder / name).write_text(text)
    return folder


def _count_low_parts(prefix: Path) -> int:
    i = 1
    while prefix.with_name(f"{prefix.name}.{i}").exists():
        i += 1
    return i - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--no-tokenizer", action="store_true", help="pack: leave tokenizer.json out (it travels once)")
    p.add_argument("--fast", action="store_true", help="pack: lzma preset 1 (faster; part 0 ~5%% larger: 14.4 vs 13.7 MB for sst2-mux2)")
    a = p.parse_args()
    if a.action == "pack":
        for path in pack(Path(a.src), Path(a.dst), tokenizer=not a.no_tokenizer, preset=1 if a.fast else 6):
            print(path, path.stat().st_size)
    else:
        print(unpack(Path(a.src), Path(a.dst)))


if __name__ == "__main__":
    main()
