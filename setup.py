from setuptools import setup

setup(
    name="ftcore",
    version="0.1.0",
    description="Instruction fine-tuning in raw PyTorch: FSDP2, activation checkpointing, bf16, fused Triton loss",
    python_requires=">=3.11",  # tomllib
    packages=["ftcore", "ftcore.kernels"],
    # kernels/ lives at the top level of the repo but installs as ftcore.kernels: a top-level
    # `kernels` module would clash with the PyPI package of that name that transformers imports.
    package_dir={"ftcore": "ftcore", "ftcore.kernels": "kernels"},
    install_requires=["torch", "tokenizers", "safetensors", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "transformers", "rouge-score", "sacrebleu", "triton", "matplotlib"],
        "bench": ["matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["ftcore=ftcore.cli:main"]},
)
