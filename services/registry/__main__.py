from aimass.registry.main import main

main()
