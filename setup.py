"""Packaging for ald_jax: Actor-Learner Distillation in JAX/Flax."""
import setuptools

# The package page's text: what it is and where to read on (the README is
# the repository's front page, too long for an index).
LONG_DESCRIPTION = """\
# ald_jax

Actor-Learner Distillation (Parisotto & Salakhutdinov, ICLR 2021) in
JAX/Flax: a Gated Transformer-XL learner is trained with V-MPO or V-trace
and continually distilled into a small LSTM actor, which alone acts, on
pinned CPU threads or processes, inside a measured per-step latency budget.

    pip install ald_jax
    ald-train --agent=ald --env=imaze --total_env_steps=200000

Includes the memory environments of the paper (I-Maze, Meta-Fetch), a
dm_env and gymnasium interface for your own environments, checkpointed and
resumable runs, and the learner's pure JAX step functions for use in your
own code. Documentation: see the project's docs/ (index.md).
"""

setuptools.setup(
    name="ald_jax",
    version="0.1.0",
    description=(
        "Actor-Learner Distillation: a GTrXL learner continually distilled "
        "into a fast LSTM actor, in JAX/Flax."
    ),
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    author="The ald_jax authors",
    # Placeholders until the project has public addresses.
    url="https://example.org/ald_jax",
    project_urls={
        "Documentation": "https://example.org/ald_jax/docs",
        "Source": "https://example.org/ald_jax/source",
        "Issues": "https://example.org/ald_jax/issues",
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    keywords="reinforcement-learning distillation transformers jax flax",
    packages=setuptools.find_packages(include=["ald_jax", "ald_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "chex>=0.1.90",
        "dm-env>=1.6",
        "numpy>=1.26",
        "absl-py>=2.1",
        "orbax-checkpoint>=0.11",
        "matplotlib>=3.8",
        # jax.export serialization (the exported actor's step.jax_export).
        "flatbuffers>=24.3",
    ],
    extras_require={
        # rlax is a test-only oracle: at runtime it would drag in distrax and TFP.
        # tensorboardX in "test" too: `make` installs .[test] and the metrics
        # tests read its event files back.
        # nbclient/nbformat/ipykernel: tests/test_notebook.py executes the Colab
        # notebook in a kernel, so a broken notebook fails the suite.
        # pytest-xdist: `make test` runs two workers; most of the suite's time
        # is XLA compiling learner variants, which is single-threaded.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.6",
                 "rlax>=0.1.6", "gymnasium>=1.0",
                 "tensorboardX>=2.6", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
        "gymnasium": ["gymnasium>=1.0"],
        # TensorBoard scalars from MetricsWriter (writes event files; no TF).
        "tensorboard": ["tensorboardX>=2.6"],
        "cuda": ["jax[cuda12]>=0.10"],
        # --actors=ray: Ray actor processes on one machine or a cluster
        # (--actors=processes needs no Ray).
        # Plain `ray` (core) is enough; no dashboard or autoscaler needed.
        "ray": ["ray>=2.40"],
        # `make docs`: the static site built from docs/ (mkdocs.yml).
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5"],
    },
    entry_points={"console_scripts": ["ald-train=ald_jax.train:run_cli"]},
)
