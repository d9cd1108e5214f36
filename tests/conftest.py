import os
import sys

import jax

# Sharding tests run on 8 fake CPU devices; this must happen before JAX starts a backend.
jax.config.update("jax_num_cpu_devices", 8)
# Tests compare float32 against float64 references at ~1e-5; GPUs multiply float32 in TF32
# by default (~1e-3 relative error). No effect on CPU, where float32 is already exact.
jax.config.update("jax_default_matmul_precision", "highest")

# Tests import small helper modules (toy models) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
