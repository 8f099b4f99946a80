from aimass.pipeline.main import main

main()
