from setuptools import find_packages, setup

setup(
    name="ftcore",
    version="0.1.0",
    description="Instruction fine-tuning in raw PyTorch: FSDP2, activation checkpointing, bf16, fused Triton loss",
    python_requires=">=3.11",  # tomllib
    # every package under ftcore/, found rather than listed (a subpackage left off a hand-written
    # list is missing from the wheel while an editable install still works). kernels/ (no
    # __init__.py, so `import kernels` never finds it) installs as ftcore.kernels, whose
    # __init__.py lives at ftcore/kernels/: one package, two source folders (docs/design.md).
    packages=find_packages(include=["ftcore", "ftcore.*"]),
    package_dir={"ftcore": "ftcore", "ftcore.kernels": "kernels"},
    package_data={"ftcore": ["kernels/__init__.py"]},
    install_requires=["torch", "tokenizers", "safetensors", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "gguf": ["gguf"],  # GGUF files (llama.cpp) in and out: the format's own library
        # transformers reads GGUF with gguf and accelerate: the reference the GGUF tests check against;
        # pyyaml: the reference ftcore's own YAML reader (ftcore/data/miniyaml.py) is checked against
        "test": ["pytest", "transformers", "rouge-score", "sacrebleu", "triton", "matplotlib", "gguf", "accelerate",
                 "pyyaml", "tensorboard"],
        "bench": ["matplotlib"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # log.tensorboard = true: event files under RUN_DIR/tensorboard/
    },
    entry_points={"console_scripts": ["ftcore=ftcore.cli:main"]},
)
