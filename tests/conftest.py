"""Test set-up shared by every test module.

Eight fake CPU devices so sharding tests can build real meshes; absl flags marked parsed so
grain's worker processes and absl-using code do not raise UnparsedFlagAccessError.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
