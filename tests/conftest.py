import os

# Triton chooses interpreter mode when it is imported: set it before anything imports triton.
if not os.environ.get("FTCORE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
