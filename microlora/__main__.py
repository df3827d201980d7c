from microlora.cli import main

main()
