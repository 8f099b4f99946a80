from aimass.compression.main import main

main()
