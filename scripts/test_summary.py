"""Print `N passed, N failed` from the closing line of a trial log (CI reads that line)."""

import re
import sys


def summarise(text: str) -> str:
    last = ""
    for line in text.splitlines():
        if line.startswith(("PASSED", "FAILED")):
            last = line
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", last)}
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    if not last:
        failed = max(failed, 1)
    return f"{passed} passed, {failed} failed"


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else ".trial.log"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            print(summarise(f.read()))
    except OSError:
        print("0 passed, 1 failed")
