#!/usr/bin/env python3
"""Write N real BBC News texts as JSONL lines {"text": ...} for scripts/check_export.py.

Takes the first N ids of the eval split (--split split.json, as ferrotune
writes it), or the first N files in sorted order when no split is given.
Stdlib only.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", help="split.json; texts come from its eval ids")
    ap.add_argument("--data", default=str(REPO / "assets" / "bbc-news"), help="BBC News folder")
    ap.add_argument("-n", "--num", type=int, default=100, help="how many texts (default 100)")
    ap.add_argument("--output", "-o", help="output file (default: stdout)")
    args = ap.parse_args()

    data = Path(args.data)
    if args.split:
        ids = json.loads(Path(args.split).read_text())["eval"]
    else:
        ids = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*.txt"))
    ids = ids[:args.num]

    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for rel in ids:
        raw = (data / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            print(f"note: {rel} is not valid UTF-8; decoded as latin-1", file=sys.stderr)
            text = raw.decode("latin-1")
        out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    if out is not sys.stdout:
        out.close()
    print(f"wrote {len(ids)} texts", file=sys.stderr)


if __name__ == "__main__":
    main()
