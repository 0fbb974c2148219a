"""Print the short table that ends tests/gpu/run_checks.sh, from what its sections wrote under $OUT."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _junit(path: Path) -> str:
    if not path.is_file():
        return "not run"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, fail = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    verdict = "FAIL" if fail else ("ok" if tests > skipped else "skipped")
    return f"{verdict}: {tests - fail - skipped} passed, {fail} failed, {skipped} skipped"


def rows(out: Path) -> list[tuple[str, str]]:
    table = [("kernels vs reference", _junit(out / "kernels.xml"))]
    te = out / "te.txt"
    te_text = te.read_text().strip() if te.is_file() else ""
    table.append(("TE vs torch", te_text if te_text.startswith("unverified") else _junit(out / "te.xml")))
    table.append(("FP8 tp2 vs bf16 tp2", _fp8tp(out)))
    modes = out / "modes.json"
    if modes.is_file():
        for name, r in json.loads(modes.read_text()).items():
            if "error" in r:
                table.append((f"train 1b {name}", f"ERROR {r['error'][:80]}"))
            elif "skipped" in r:
                table.append((f"train 1b {name}", f"skipped: {r['skipped'][:80]}"))
            else:
                loss = "loss ok" if r.get("loss_ok") else "LOSS DIFFERS"
                table.append(
                    (
                        f"train 1b {name}",
                        f"{loss} (max rel {r.get('max_loss_rel_vs_eager', 0):.1e}), step "
                        f"{r['step_time_s'] * 1e3:.0f} ms, speedup x{r.get('speedup_vs_eager', 1):.2f}",
                    )
                )
    else:
        table.append(("train 1b modes", "not run"))
    bench = out / "bench.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        table.append(
            (
                "bench 1b",
                f"{b['device']}: {b['tflops_per_device']:.0f} TFLOP/s, MFU {b['mfu']:.1%}, "
                f"{b['tokens_per_s_per_device']:.0f} tok/s, step {b['step_time_s'] * 1e3:.0f} ms",
            )
        )
    else:
        table.append(("bench 1b", "not run"))
    table.append(("loaders to GPU", _dali(out / "dali.json")))
    return table


def _fp8tp(out: Path) -> str:
    note = out / "fp8tp.txt"
    if note.is_file():
        return note.read_text().strip()
    path = out / "fp8tp.json"
    if not path.is_file():
        return "not run"
    r = json.loads(path.read_text())
    f = r["fp8"]
    return (
        f"{'ok' if r['ok'] else 'FAIL'}: loss max rel {r['max_loss_rel']:.1e} (tol {r['loss_rtol']:.0e}), "
        f"{f['tp_linears_on_te']}/{f['tp_linears']} TP linears on TE FP8, scales equal over tp: "
        f"{f.get('scales_agree_over_tp')}"
    )


def _dali(path: Path) -> str:
    if not path.is_file():
        return "not run"
    d = json.loads(path.read_text())
    if "skipped" in d:
        return f"unverified ({d['skipped']})"
    speeds = ", ".join(f"{name} {s['of_raw']:.2f}" for name, s in d["loaders"].items())
    return f"{'same batches' if d['ok'] else 'BATCHES DIFFER'}; of raw {d['raw_gb_per_s']:.1f} GB/s: {speeds}"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "gpu-out")
    table = rows(out)
    width = max(len(k) for k, _ in table)
    print("=" * 78)
    for k, v in table:
        print(f"{k.ljust(width)}  {v}")
    print("=" * 78)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
