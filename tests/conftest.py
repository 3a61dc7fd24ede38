"""8 host CPU devices for sharding tests; must run before jax is imported."""

import os
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Runs' token cache (default ~/.cache/flaxdistil) goes to a per-session temp dir; subprocesses inherit it.
os.environ.setdefault('FLAXDISTIL_CACHE', tempfile.mkdtemp(prefix='flaxdistil_cache_'))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
