from h_classifiers.commands.toy_report import main


main()
