#!/usr/bin/env python3
"""Prints what TensorBoard reads from a run (a folder of event files), as JSON.

Usage: target/tb-venv/bin/python scripts/tensorboard-scalars.py RUN_DIR

Reads with TensorBoard's own EventAccumulator (every point kept, no sampling) and prints
{"file_version": ..., "scalars": {tag: [[step, wall_time, value], ...]}}. The TensorBoard
tests of starling-server and starling-cli run it to check the event files Starling writes;
scripts/tensorboard-venv.sh installs the pinned TensorBoard it needs.
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    EventAccumulator,
)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    acc = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0})
    acc.Reload()
    scalars = {
        tag: [[e.step, e.wall_time, e.value] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    print(json.dumps({"file_version": acc.file_version, "scalars": scalars}))


if __name__ == "__main__":
    main()
