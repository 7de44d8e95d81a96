from moon.cli import main

main()
