from spiral_cli.cli import main

main()
