"""`storynet-miner loadtest` under the name this script had; `storynet-miner loadtest --help` says the rest."""
import sys

from miner.cli import main

raise SystemExit(main(["loadtest", *sys.argv[1:]]))
