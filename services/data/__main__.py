from aimass.data.main import main

main()
