from normsurgeon.cli.app import main

main()
