from setuptools import find_packages, setup

setup(
    name="consistency-models",
    version="0.1.0",
    description="Consistency models (Song et al., ICML 2023): training, sampling, editing and evaluation",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["cm", "cm.*", "evaluations", "evaluations.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "scipy",
        "lpips",
        "mpi4py",
        "mpich",
        "blobfile",
        "tqdm",
        "pillow",
        "pyyaml",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
