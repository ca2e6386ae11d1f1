#!/usr/bin/env python3
"""Word frequencies of a text file, written for the test corpus."""

import collections
import re
import sys

WORD = re.compile(r"[A-Za-z']+")


def frequencies(path, top=10):
    counts = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(w.lower() for w in WORD.findall(line))
    return counts.most_common(top)


class Report:
    def __init__(self, rows):
        self.rows = list(rows)

    def __str__(self):
        width = max((len(w) for w, _ in self.rows), default=0)
        return "\n".join(f"{w:<{width}}  {n:>6}" for w, n in self.rows)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: freq.py FILE [TOP]", file=sys.stderr)
        sys.exit(2)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    print(Report(frequencies(sys.argv[1], top)))
    # done: lambda x: x ** 2, {1, 2}, [i for i in range(3)], 0b1010, 1e-9
