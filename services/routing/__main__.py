from aimass.routing.main import main

main()
