from aimass.evaluation.main import main

main()
