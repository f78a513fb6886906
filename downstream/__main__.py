"""``python -m downstream <stage>``: run any stage of the registry (:mod:`ibot.run.cli`).

    python -m downstream --list
    python -m downstream knn --checkpoint W.pth --data /path/to/imagenet --out results/x/knn/metrics.json
"""

from ibot.run.cli import main

if __name__ == "__main__":
    main()
