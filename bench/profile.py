"""``python -m bench.profile FILE.folded``: where a py-spy profile spends its samples.

py-spy's raw format is one collapsed stack per line (``frame;frame;frame count``). This prints
the functions with the most samples on the stack (inclusive) and on top (self), which is
enough to name a hot spot without a browser.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"\s*\(([^)]*)\)$")  # py-spy's "function (file:line)" suffix


def _frame(raw: str) -> str:
    match = _LINE.search(raw)
    name = raw[:match.start()] if match else raw
    where = match.group(1).rsplit(":", 1)[0] if match else ""
    # Shorten site-packages and stdlib paths to the module's own file name.
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name.strip()} ({where})"


def analyse(path: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f]
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    out = [f"{path}: {total} samples"]
    for title, counter in (("inclusive (on the stack)", inclusive), ("self (on top)", own)):
        out.append(f"\n{title}:")
        for frame, n in counter.most_common(top):
            out.append(f"  {100 * n / max(total, 1):5.1f}%  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    for path in args.files:
        print(analyse(path, args.top))


if __name__ == "__main__":
    main()
