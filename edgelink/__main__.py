from edgelink.cli import main

main()
