import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

# Tests run tiny tensors: one thread avoids the scheduling overhead that dominates them on 2 cores.
torch.set_num_threads(1)
