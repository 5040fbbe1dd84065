"""`storynet-miner bench` under the name this script had; `storynet-miner bench --help` says the rest."""
import sys

from miner.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
