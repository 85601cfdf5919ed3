"""`python -m relaywatch`: the command line (cli/)."""

from relaywatch.cli import main

main()
