from setuptools import setup

setup(
    name="dials-vmerge",
    version="0.1.0",
    description="Scaling and merging of diffraction data, compatible with DIALS files",
    python_requires=">=3.10",
    packages=[
        "dials_vmerge",
        "dials_vmerge.io",
        "dials_vmerge.model",
        "dials_vmerge.scaling",
        "dials_vmerge.merging",
        "dials_vmerge.simulate",
        "dials_vmerge.backends",
        "dials_vmerge.report",
        "dials_vmerge.command_line",
        "dials_vmerge.phil",
    ],
    package_dir={
        "dials_vmerge.command_line": "command_line",
        "dials_vmerge.phil": "phil",
    },
    package_data={"dials_vmerge.phil": ["*.phil"]},
    install_requires=[
        "cctbx-base>=2024.1",
        "numpy>=1.24,<3",
        "scipy>=1.11",
        "numba>=0.59",
        "h5py>=3.8",
        "msgpack>=1.0",
        "tqdm>=4.60",
        "plotly>=5.0",  # its plotly.min.js is embedded in the HTML report
        "gemmi>=0.6.5",  # MTZ reading and writing (issue 15), as dials.export
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.80", "gemmi>=0.6.5",
                 "reciprocalspaceship>=1.0"],  # issue 15: our MTZ files as rs reads them
        "mpi": ["mpi4py>=3.1", "mpich"],
    },
    entry_points={
        "console_scripts": [
            "dials.vmerge=dials_vmerge.command_line.vmerge:main",
            "dials.vmerge.merge=dials_vmerge.command_line.merge:main",
            "dials.vmerge.stats=dials_vmerge.command_line.stats:main",
            "dials.vmerge.simulate=dials_vmerge.command_line.simulate:main",
            "dials.vmerge.show=dials_vmerge.command_line.show:main",
            "dials.vmerge.devices=dials_vmerge.command_line.devices:main",
        ]
    },
)
