import os
import sys

import jax

# Sharding tests run on 8 fake CPU devices; this must happen before JAX starts a backend.
jax.config.update("jax_num_cpu_devices", 8)

# Tests import small helper modules (toy models) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
