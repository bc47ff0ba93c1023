"""Summarise benchmarks/gptq_ood_table.sh's JSON lines: one markdown row per configuration with
perplexity on the held-out pydoc windows and on the enwiki excerpt, each also as the share of
RTN's gap to fp32 that the method closes ((RTN - x) / (RTN - fp32); negative: worse than RTN),
and the quantization wall / CPU seconds.

    python benchmarks/gptq_ood_summary.py benchmarks/results/gptq-ood-2026-12-03.jsonl
"""
from __future__ import annotations

import json
import sys


def _name(r: dict) -> str:
    if "peer" in r:
        return f"GPTQModel ({r['peer'].split()[-1]})"
    m = r["method"]
    if m == "gptq":
        return f"polyquant GPTQ damp {r.get('damp')}"
    return {"fp32": "fp32", "rtn": "RTN" + (" sym" if r.get("sym") else " asym"), "awq": "polyquant AWQ"}.get(m, m)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    fp32 = next((r for r in rows if r.get("method") == "fp32"), None)
    rtn = {r["bits"]: r for r in rows if r.get("method") == "rtn"}
    texts = ("pydoc", "enwiki")
    print("| bits | method | calibration | " + " | ".join(f"{t} ppl | {t} gap closed" for t in texts)
          + " | quant s (CPU s) |")
    print("|---" * (4 + 2 * len(texts)) + "|")
    for r in rows:
        bits = "-" if r.get("method") == "fp32" else r["bits"]
        cells = []
        for t in texts:
            x = (r.get("ppl_by_text") or {}).get(t)
            cells.append(f"{x:.3f}" if x is not None else "")
            base = rtn.get(r.get("bits"))
            if x is None or fp32 is None or base is None or r is base or r is fp32:
                cells.append("")
            else:
                f, b = fp32["ppl_by_text"][t], base["ppl_by_text"][t]
                cells.append(f"{(b - x) / (b - f):+.0%}")
        calib = "-" if r.get("method") in ("fp32", "rtn") else r.get("calib", "")
        secs = "" if r.get("method") in ("fp32",) else f"{r.get('quant_seconds')} ({r.get('quant_cpu_seconds')})"
        print(f"| {bits} | {_name(r)} | {calib} | " + " | ".join(cells) + f" | {secs} |")


if __name__ == "__main__":
    main(sys.argv[1])
