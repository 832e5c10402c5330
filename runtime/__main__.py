from ldm_edge.runtime.cli.run import main

main()
