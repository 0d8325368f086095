"""Packaging for ald_jax: Actor-Learner Distillation in JAX/Flax."""
import setuptools

setuptools.setup(
    name="ald_jax",
    version="0.1.0",
    description=(
        "Actor-Learner Distillation: a GTrXL learner continually distilled "
        "into a fast LSTM actor, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
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
        # --actors=processes: actor processes on one machine or a cluster.
        # Plain `ray` (core) is enough; no dashboard or autoscaler needed.
        "ray": ["ray>=2.40"],
    },
    entry_points={"console_scripts": ["ald-train=ald_jax.train:run_cli"]},
)
