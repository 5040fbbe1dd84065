"""`storynet-miner download` under the name this script had; `storynet-miner download --help` says the rest."""
import sys

from miner.cli import main

raise SystemExit(main(["download", *sys.argv[1:]]))
