"""Training scripts the tests run: tests/data/train_tiny.py in this process (as the script
simulator does), and one that runs out of memory under an address-space cap."""

from __future__ import annotations

import runpy
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

SCRIPT = Path(__file__).parent / "data" / "train_tiny.py"


def runner(*argv: str, script: Path = SCRIPT) -> Callable[[], None]:
    """Runs ``script`` (tests/data/train_tiny.py unless told) as ``python script argv...``
    would, in this process."""

    def run() -> None:
        saved = sys.argv[:]
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved

    return run


#: A model whose last Linear has 64 x 2^20 fp32 weights (256 MiB): its output for a batch of
#: 256 is 1 GiB (the forward request), its weight gradient 256 MiB (the backward request).
OOM_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from torch import nn

    phase = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 1 << 20)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256 if phase == "forward" else 1, 64)

    def vm_size():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    # Room for the forward's small tensors but not for the request that must fail.
    headroom = (512 << 20) if phase == "forward" else (128 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + headroom, resource.RLIM_INFINITY))
    loss = model(x).sum()
    loss.backward()
    opt.step()
""")
