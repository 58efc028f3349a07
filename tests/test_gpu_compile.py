"""The kernels build with the real Triton compiler for an H100, not only under the interpreter."""

import os
import subprocess
import sys
from pathlib import Path


def test_every_kernel_compiles_for_sm90():
    script = Path(__file__).with_name("compile_for_gpu.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("for sm_90") == 10, done.stdout
