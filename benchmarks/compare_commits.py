"""Side-by-side training speed of one script at two or more git revisions: how much one change bought.

Each revision's `sac_continuous.py` or `td3_continuous.py` is checked out into a temporary folder and timed exactly
as `speed.py` times ours (Hopper-v5, 1000 random steps, 1000 untimed update steps, 3000 timed steps, fresh process
per run); the revisions alternate, `--repeats` times, and the table gives medians and ratios to the first revision.

    python benchmarks/compare_commits.py --algo td3 --repeats 3 5594518~1 5594518
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (the timing of our scripts, shared with speed.py)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=["sac", "td3"], default="sac")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("revisions", nargs="+", help="git revisions to compare; the first is the baseline")
    args = parser.parse_args()
    script, repository = f"{args.algo}_continuous.py", speed.ROOT
    with tempfile.TemporaryDirectory() as workdir:
        folders = {}
        for revision in args.revisions:
            folders[revision] = os.path.join(workdir, revision.replace("/", "_"))
            os.makedirs(folders[revision])
            source = subprocess.run(["git", "show", f"{revision}:{script}"], cwd=repository, check=True,
                                    capture_output=True, text=True).stdout
            with open(os.path.join(folders[revision], script), "w") as file:
                file.write(source)
        results = {revision: [] for revision in args.revisions}
        for repeat in range(args.repeats):
            order = args.revisions if repeat % 2 == 0 else args.revisions[::-1]
            for revision in order:
                speed.ROOT = folders[revision]
                results[revision].append(speed.run_ours(script, 1000, 1000, 3000, compile=False))
                print(f"repeat {repeat + 1}: {revision}: {results[revision][-1]:.1f} updates/s", flush=True)
    baseline = statistics.median(results[args.revisions[0]])
    print(f"\n{script}, Hopper-v5, median of {args.repeats}")
    print("| revision | updates/s (median) | runs | ratio |\n|---|---|---|---|")
    for revision, values in results.items():
        runs = ", ".join(f"{value:.0f}" for value in values)
        median = statistics.median(values)
        print(f"| {revision} | {median:.1f} | {runs} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
