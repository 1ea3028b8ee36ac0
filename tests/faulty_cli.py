"""`ftcore` with faults injected into the checkpoint save, for the crash tests (never shipped):

    python tests/faulty_cli.py --fail-save-rank R  ARGS...   rank R's part of a save fails (a full disk)
    python tests/faulty_cli.py --save-delay-s S    ARGS...   each rank's part of a save takes S s longer,
                                                             so a test can kill the run mid-save
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ftcore.checkpoint as checkpoint  # noqa: E402
from ftcore.cli import main  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--fail-save-rank", type=int, default=-1)
ap.add_argument("--save-delay-s", type=float, default=0.0)
faults, argv = ap.parse_known_args()
rank = int(os.environ.get("RANK", "0"))
rng_state = checkpoint._rng_state  # called by every rank once its DCP shard is written


def faulty_rng_state():
    if rank == faults.fail_save_rank:
        raise OSError(28, "No space left on device (test)")
    time.sleep(faults.save_delay_s)
    return rng_state()


checkpoint._rng_state = faulty_rng_state
sys.exit(main(argv))
