"""`storynet-miner convert` under the name this script had; `storynet-miner convert --help` says the rest."""
import sys

from miner.cli import main

raise SystemExit(main(["convert", *sys.argv[1:]]))
