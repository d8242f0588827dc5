from jewelclf.cli import main

main()
