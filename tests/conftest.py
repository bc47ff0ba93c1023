import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run in Triton's interpreter (CPU tensors). The interpreter can run
# triton.language's own @jit helpers (tl.sum, tl.max) only when TRITON_INTERPRET is set before triton
# is imported; on a CUDA machine it stays unset so the compiled-kernel tests compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the previous thread count comes back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
