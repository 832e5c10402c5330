from .cli.run import main

main()
