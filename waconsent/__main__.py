from waconsent.cli import main

main()
