import os

# Triton chooses interpreter mode when it is imported: set it before anything imports triton.
if not os.environ.get("FTCORE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `train.precision = auto` caches a CPU probe under XDG_CACHE_HOME: the suite (and the runs it starts)
# gets a cache of its own, so a user's cache neither decides a test nor gets written by one
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ftcore-test-cache-")
