from pipeline.cli.program import main

main()
