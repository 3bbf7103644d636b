from mc_retrofit.cli import main

main()
