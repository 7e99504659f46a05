from layerlock.verifier.cli import main

main()
