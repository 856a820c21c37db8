"""Side-by-side training loss of two train_gpt.py logs (e.g. 1 GPU vs 2 GPUs at the same global
batch), with the mean and largest difference over the steps both logged.

    python3 bench/compare_losses.py logs/a.txt logs/b.txt [first_steps]

With first_steps, a second summary covers only steps 1..first_steps.
"""

import re
import sys


def losses(path):
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+) loss (\S+)", open(path).read(), re.M)}


def main():
    a, b = losses(sys.argv[1]), losses(sys.argv[2])
    steps = sorted(set(a) & set(b))
    print(f"{'step':>5s} {'A':>9s} {'B':>9s} {'B-A':>9s}")
    for s in steps:
        print(f"{s:5d} {a[s]:9.4f} {b[s]:9.4f} {b[s] - a[s]:+9.4f}")
    spans = [steps] + ([[s for s in steps if s <= int(sys.argv[3])]] if len(sys.argv) > 3 else [])
    for span in spans:
        diffs = [b[s] - a[s] for s in span]
        print(f"{len(span)} steps: mean B-A {sum(diffs) / len(diffs):+.4f}, mean |B-A| {sum(map(abs, diffs)) / len(diffs):.4f}, largest |B-A| {max(map(abs, diffs)):.4f}")


if __name__ == "__main__":
    main()
