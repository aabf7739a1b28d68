"""Preparation memory of image rows: `sftlab prepare` on N rows that each reference a PNG file, against the
same rows with their images removed (the baseline), in the same run.

1. N (default 10 000) seeded PNG files of four sizes (24x24, 32x32, 48x32, 40x56; random pixels) and
   two JSONL files: LLaMA-Factory rows `{"messages": [user "<image>What colour is the shape?",
   assistant <colour>], "images": [path]}`, and the same rows without `<image>` and `images`.
2. The demo's tiny LLaVA with its processor (src/sftlab/demo/make_vlm.py: CLIP processor at 32x32,
   17 image tokens per image), saved once into the work directory.
3. `sftlab prepare` on each file (num_proc as given, each into its own empty cache directory, packing
   none, no eval split) in a child process whose memory is sampled every 200 ms from /proc
   (benchmarks/scale_case.py `measure`): the peak RSS of the main process, its peak RssAnon, and the
   peak PSS of the process tree (main + workers; shared pages split, not counted twice). Time: the
   child's wall time (with Python's and torch's start) and the preparation alone (the "prepared in"
   that `sftlab prepare` prints); rows/s from the latter.

The images are read (decoded and checked) during preparation and not kept: each example stores only
its references, so the image run's peak should stay close to the text run's and far below 1 GB.

    python benchmarks/bench_vlm_prepare.py                      # 10 000 rows, num_proc 1
    python benchmarks/bench_vlm_prepare.py --rows 50000 --num-proc 2 --dir /tmp/vlm-prep
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_case import measure, sftlab  # noqa: E402

from sftlab.demo.make_vlm import COLOURS, QUESTION, write_model  # noqa: E402

SIZES = ((24, 24), (32, 32), (48, 32), (40, 56))


def write_rows(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """N PNG files and the two JSONL files (with images / without), written one row at a time."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "images.jsonl", "w") as with_images, open(root / "text.jsonl", "w") as text:
        for k in range(n):
            w, h = SIZES[k % len(SIZES)]
            name = f"img/{k:06d}.png"
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(root / name)
            colour = pick.choice(list(COLOURS))
            with_images.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"<image>{QUESTION}"},
                            {"role": "assistant", "content": colour},
                        ],
                        "images": [name],
                    }
                )
                + "\n"
            )
            text.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": colour},
                        ]
                    }
                )
                + "\n"
            )
    return root / "images.jsonl", root / "text.jsonl"


def config(path: Path, model: Path, data: Path, cache: Path, num_proc: int) -> Path:
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "model": {"name_or_path": str(model)},
                "data": {
                    "train": [{"path": str(data)}],
                    "eval_fraction": 0.0,
                    "max_seq_length": 256,
                    "packing": "none",
                    "num_proc": num_proc,
                    "cache_dir": str(cache),
                },
                "train": {"output_dir": str(path.parent / "out")},
                "match_eval": None,
            }
        )
    )
    return path


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument(
        "--dir", type=Path, default=None, help="work directory (default: a temporary one, removed)"
    )
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-vlm-prepare-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        stamp = root / f".rows-{args.rows}-{args.seed}"
        if not stamp.is_file():
            write_rows(root, args.rows, args.seed)
            stamp.write_text("1\n")
        if not (root / "model" / "config.json").is_file():
            write_model(root)
        print(
            f"{platform.processor() or platform.machine()}, python {platform.python_version()}; "
            f"{args.rows} rows, num_proc {args.num_proc}, work directory {root}"
        )
        results = {}
        for name, data in (("images", root / "images.jsonl"), ("text (baseline)", root / "text.jsonl")):
            run = root / f"run-{name.split()[0]}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir()
            cfg = config(run / "config.yaml", root / "model", data, run / "cache", args.num_proc)
            m = measure(sftlab("prepare", str(cfg)), run / "prepare.log")
            if m.rc != 0:
                print(f"{name}: sftlab prepare failed (rc {m.rc}):\n{m.tail}")
                return 1
            summary = next(
                (x for x in (run / "prepare.log").read_text().splitlines() if x.startswith("train ")), ""
            )
            found = re.search(r"prepared in ([0-9.]+)s", summary)
            m.prepared = float(found.group(1)) if found else float("nan")  # the data preparation alone
            results[name] = m
            print(
                f"{name:16s} process {m.seconds:6.1f} s, preparation {m.prepared:6.1f} s "
                f"{args.rows / m.prepared:7.0f} rows/s   peak RSS {mib(m.main_rss):>8s}   peak RssAnon "
                f"{mib(m.main_anon):>8s}   peak tree PSS {mib(m.tree_rss):>8s}"
            )
            print(f"{'':16s} {summary}")
        img, txt = results["images"], results["text (baseline)"]
        print(
            f"images / text: preparation time {img.prepared / txt.prepared:.2f}x, "
            f"peak RSS {img.main_rss / txt.main_rss:.2f}x, "
            f"peak RssAnon {img.main_anon / txt.main_anon:.2f}x, peak RSS difference "
            f"{mib(img.main_rss - txt.main_rss)} ({(img.main_rss - txt.main_rss) / args.rows:.0f} bytes/row)"
        )
        return 0
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
