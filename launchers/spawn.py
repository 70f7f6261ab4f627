"""torchrun on this machine, as `python th.py run RECIPE` starts it for the engines that run one process per
device (thcore/launch.py decides, and says why torchrun runs inside this file)."""
import sys

from thcore.launch import torchrun_main

if __name__ == "__main__":
    torchrun_main(sys.argv[1:])
