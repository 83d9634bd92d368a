from lightning_hypergrad.cli import main

main()
