from setuptools import find_packages, setup

# Lower bounds: torch 2.6 is the first release whose torch.load(weights_only=True) has no published way to
# run code hidden in a checkpoint (CVE-2025-32434 affects <= 2.5.1; cm/safe_load.py refuses .pt files on an
# older torch at run time); it also has everything the code calls (2.4 added the CPU kernels of the fused
# Adam/AdamW that cm/train_util.py uses on every device). torchvision 0.21 is torch 2.6's.
# CI pins the exact pair in constraints.txt (pip install -e ".[test]" -c constraints.txt).
# The only upper bound is the next major release, so a cluster's own CUDA build of torch is kept.
MPI = ["mpi4py", "mpich"]
DIFFUSERS = ["diffusers>=0.22"]  # 0.22: UNet2DModel(dropout=...), which the export passes
DATA = ["lmdb"]

setup(
    name="consistency-models",
    version="0.1.0",
    description="Consistency models (Song et al., ICML 2023): training, sampling, editing and evaluation",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["cm", "cm.*", "evaluations", "evaluations.*"]),
    install_requires=[
        "torch>=2.6,<3",
        "torchvision>=0.21",
        "numpy",
        "scipy",
        "lpips",
        "blobfile",
        "tqdm",
        "pillow",
        "pyyaml",
        "scikit-learn",
        "safetensors>=0.4",
        "matplotlib>=3.5",
    ],
    extras_require={
        # mpiexec launches: mpi4py and an MPI library (with a cluster's own MPI, pip install mpi4py alone)
        "mpi": MPI,
        # scripts/export_diffusers.py (reading a diffusers folder back needs only safetensors)
        "diffusers": DIFFUSERS,
        # scripts/prepare_data.py --kind lsun (LSUN's lmdb exports)
        "data": DATA,
        # everything the test suite runs, so that no test is skipped in CI
        "test": ["pytest", "pytest-timeout", "pytest-xdist"] + MPI + DIFFUSERS + DATA,
    },
)
