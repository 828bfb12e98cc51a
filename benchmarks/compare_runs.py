"""Two `leanlm spec bench` runs side by side, prompt by prompt: τ+1 of each and the difference with a 95% paired
bootstrap interval (`leanlm.speculative.bench.paired_tau_difference`), over the prompts both runs decoded. Use it
to tell whether a new draft head accepts more than the old one on the same questions, beyond what the choice of
questions explains.

    python benchmarks/compare_runs.py runs/old.jsonl runs/new.jsonl --strategy eagle2 [--strategy-b eagle2] \\
        [--label-a "four epochs" --label-b "five epochs"] [--out docs/results/x.md]

Reads the `OUT.jsonl` journals `spec bench --out OUT.json` writes as prompts finish (a run that is still going
compares over what it has); prints a markdown table, and writes it to `--out` when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    from leanlm.speculative.bench import paired_tau_difference, read_journal

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="the first run's OUT.jsonl")
    ap.add_argument("b", help="the second run's OUT.jsonl")
    ap.add_argument("--strategy", default="eagle2", help="strategy name in the first run (as given to --strategies)")
    ap.add_argument("--strategy-b", default=None, help="strategy name in the second run (default: --strategy)")
    ap.add_argument("--label-a", default=None)
    ap.add_argument("--label-b", default=None)
    ap.add_argument("--out", default=None, help="markdown file for the table")
    args = ap.parse_args()
    ra, rb = read_journal(args.a), read_journal(args.b)
    sets = sorted({r["prompts"] for r in ra})
    lines = [f"| prompts | n | τ+1 {args.label_a or args.a} | τ+1 {args.label_b or args.b} | difference | 95% CI (paired) |",
             "|---|---|---|---|---|---|"]
    for s in sets:
        d = paired_tau_difference([r for r in ra if r["prompts"] == s], [r for r in rb if r["prompts"] == s],
                                  args.strategy, args.strategy_b)
        lines.append(f"| {s} | {d['n']} | {d['tau_a'] + 1:.3f} | {d['tau_b'] + 1:.3f} | {d['diff']:+.3f} | "
                     f"{d['diff_ci95'][0]:+.3f} to {d['diff_ci95'][1]:+.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
