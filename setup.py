"""Packaging for megagen: one distribution, three import packages.

`parallel/` and `kernels/` live at the top of the repository (they are the engine and the fused ops, and
know nothing of models) but install as `megagen.parallel` and `megagen.kernels`.
"""

from setuptools import find_packages, setup

_core = find_packages(include=["megagen", "megagen.*"])
_parallel = ["megagen.parallel"] + ["megagen.parallel." + p for p in find_packages(where="parallel")]
_kernels = ["megagen.kernels"] + ["megagen.kernels." + p for p in find_packages(where="kernels")]

setup(
    name="megagen",
    version="0.1.0",
    description="3D-parallel training of Movie-Gen-class media foundation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_core + _parallel + _kernels,
    package_dir={"megagen.parallel": "parallel", "megagen.kernels": "kernels"},
    package_data={"megagen.parallel.planner": ["clusters/*.yaml"], "megagen": ["templates/*"]},
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "safetensors>=0.4",
    ],
    extras_require={
        # diffusers: the reference Wan for the wan tests; accelerate: its from_pretrained needs it for Wan
        "dev": [
            "pytest>=8",
            "ruff>=0.5",
            "pillow>=10",  # contact sheets in tests/unit/test_media.py (megagen imports it lazily)
            "hypothesis>=6.100",
            "import-linter>=2.0",
            "diffusers>=0.33",
            "accelerate>=1.0",
            "av>=12",
            "transformers>=4.40",  # megagen data encode's tests: a tiny local T5 text encoder
        ],
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "gpu": ["transformer-engine[pytorch]>=1.10", "nvtx>=0.2", "triton>=3.0"],
        "media": ["av>=12", "pillow>=10"],
    },
    entry_points={"console_scripts": ["megagen = megagen.cli:main"]},
)
