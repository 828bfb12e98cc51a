"""Zero-shot comparison of the models trained by `benchmarks/wisca_pretrain.py` (run that first).

Scores every (group size, variant, seed) final checkpoint on the evaluation suite's tasks with a fixed subset and
reports mean accuracy over seeds per variant. Models of this size are expected to be near chance; the table is
there to show it, not to rank the variants (wisca.md, section 5 item 3).

    python benchmarks/wisca_zeroshot.py --limit 200                 # all 18 models
    python benchmarks/wisca_zeroshot.py --limit 100 --runs 'g4-*'   # group size 4 only
Writes docs/results/wisca-zeroshot.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from leanlm.inference import load_model_and_tokenizer
from leanlm.evals.suite import run_suite

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande", "copa", "lambada"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench" / "wisca-pretrain"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--runs", default="g*-*-s*", help="glob over run folders, e.g. 'g4-*' for group size 4 only")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    runs = []
    for run_dir in sorted(Path(args.work).glob(args.runs)):
        group, rest = run_dir.name.split("-", 1)
        variant, seed = rest.rsplit("-s", 1)
        ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
        model, tok = load_model_and_tokenizer(str(ckpts[-1]))
        res = run_suite(model, tok, tasks, args.limit, batch_size=32, progress=False)
        runs.append({"group": int(group[1:]), "variant": variant, "seed": int(seed), "results": res})
        print(run_dir.name, {t: round(r["acc"], 3) for t, r in res.items()}, flush=True)
    table = {}
    for g in sorted({r["group"] for r in runs}, reverse=True):
        for v in ("baseline", "wisca", "lr-control"):
            mine = [r for r in runs if r["group"] == g and r["variant"] == v]
            if mine:
                table[f"g{g}/{v}"] = {t: statistics.mean(r["results"][t]["acc"] for r in mine) for t in tasks}
    out = ROOT / "docs" / "results" / "wisca-zeroshot.json"
    out.write_text(json.dumps({"args": vars(args), "table": table, "runs": runs}, indent=1) + "\n")
    print("| setting | " + " | ".join(tasks) + " |")
    for k, row in table.items():
        print(f"| {k} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
