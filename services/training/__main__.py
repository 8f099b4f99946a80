from aimass.training.main import main

main()
