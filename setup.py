from setuptools import find_packages, setup

with open("grazbids/__init__.py") as f:
    version = next(line.split('"')[1] for line in f if line.startswith("__version__"))

setup(
    name="grazbids",
    version=version,
    description="Relevance-guided (Graz+) 3D CNN training and explanation of brain MRI, as a BIDS App",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]),
    include_package_data=True,
    package_data={"grazbids": ["data/*", "data/**/*"]},
    install_requires=[
        "torch>=2.2",
        "numpy>=1.26",
        "nibabel>=5",
        "nipype>=1.8",
        "pybids>=0.16",
        "templateflow>=24",
        "antspyx>=0.5",
        "deepbet==1.0.2",  # brain extraction of raw heads; weights ship in the wheel
        "nilearn>=0.10",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "pandas",
        "scipy",
    ],
    extras_require={"test": ["pytest>=7", "bids-validator-deno", "boutiques>=0.5.33"]},
    entry_points={"console_scripts": ["grazbids=grazbids.cli.run:main", "grazbids-train=grazbids.group.torchrun:main", "grazbids-simulate=grazbids.simulate.cli:main"]},
)
