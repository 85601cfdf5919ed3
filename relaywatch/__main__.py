from relaywatch.cli import main

main()
