"""`python -m spiral_cli ARGS` for tests/test_sft_ddp.py under torchrun: the command, then one JSON
line on stdout saying whether the process group outlived it (it must not: left to the
interpreter's teardown, gloo's threads now and then abort the process; processes.end_processes)."""
import json
import sys

import torch.distributed as dist

from spiral_cli.cli import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code
    print(json.dumps({"group_left": dist.is_initialized()}), flush=True)
    sys.exit(code)
